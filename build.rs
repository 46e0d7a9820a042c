// Re-embed the migrations whenever one is added or changed (sqlx::migrate!
// reads the directory at build time).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

//! Placement and routing in the database (SPEC §12), through the store a
//! worker of each node holds: `rtm_route` answers where a command runs and
//! places a new game, once, however many workers ask at the same time.

use rtmanager::config::NodeConfig;
use rtmanager::domain::{CommandRequest, GameId, NodeName, OpKind};
use rtmanager::error::ErrorCode;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::ports::{Admission, InboxClaim, Route, RuntimeStore};

use crate::harness::{TestDb, command_request, unique};

const IMAGE: &str = "rtm-test/engine:1.4.2";

fn node(name: &str) -> NodeName {
    NodeName::parse(name).unwrap()
}

/// A store of a worker on `name`, its node registered with `max_games`.
async fn worker_of(db: &TestDb, name: &str, max_games: u32) -> PgStore {
    let store = PgStore::new(db.pool.clone()).on_node(node(name));
    store
        .heartbeat(&NodeConfig {
            name: node(name),
            max_games,
        })
        .await
        .unwrap();
    store
}

fn start(game: &GameId) -> CommandRequest {
    command_request(OpKind::Start, game, Some(IMAGE))
}

fn fresh_game() -> GameId {
    GameId::parse(&unique("g")).unwrap()
}

/// Puts `n` running games on `node` as records (what a start there leaves).
async fn running_on(db: &TestDb, node: &str, n: usize) {
    for _ in 0..n {
        sqlx::query(
            "insert into runtime_records (game_id, status, current_image_ref,
                 current_container_id, state_dir, fence, node)
             values ($1, 'running', $2, 'c', '/tmp/x', 1, $3)",
        )
        .bind(unique("busy"))
        .bind(IMAGE)
        .bind(node)
        .execute(&db.pool)
        .await
        .unwrap();
    }
}

async fn placed(db: &TestDb, game: &GameId) -> Option<String> {
    sqlx::query_scalar("select node from placements where game_id = $1")
        .bind(game.as_str())
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

fn refused(route: Route) -> (ErrorCode, String) {
    match route {
        Route::Refused(f) => (f.code, f.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_lone_node_places_every_game_on_itself() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let game = fresh_game();
    assert_eq!(n1.route(&start(&game)).await.unwrap(), Route::Here);
    assert_eq!(placed(&db, &game).await.as_deref(), Some("n1"));
    for op in [OpKind::Stop, OpKind::Patch, OpKind::Remove] {
        let request = command_request(op, &game, Some(IMAGE));
        assert_eq!(n1.route(&request).await.unwrap(), Route::Here, "{op:?}");
    }
    // An unknown game's stop is answered where it landed (not_found).
    let stop = command_request(OpKind::Stop, &fresh_game(), None);
    assert_eq!(n1.route(&stop).await.unwrap(), Route::Here);
}

#[tokio::test]
async fn a_new_game_goes_to_the_node_with_fewest_games_and_stays_there() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let n2 = worker_of(&db, "n2", 200).await;
    running_on(&db, "n1", 3).await;
    running_on(&db, "n2", 1).await;
    let game = fresh_game();
    let request = start(&game);
    // Asked on n1, placed on n2 (fewer games): forwarded there.
    assert_eq!(
        n1.route(&request).await.unwrap(),
        Route::Forward(node("n2"))
    );
    // The forwarded copy, routed again on n2: runs there.
    assert_eq!(n2.route(&request).await.unwrap(), Route::Here);
    // A second start of the still-unstarted game follows the first, even
    // though n2 now counts one more game than before.
    running_on(&db, "n2", 5).await;
    let again = start(&game);
    assert_eq!(n1.route(&again).await.unwrap(), Route::Forward(node("n2")));
    // Every other command of the game goes to its node.
    for op in [OpKind::Stop, OpKind::Restart, OpKind::Patch, OpKind::Remove] {
        let request = command_request(op, &game, Some(IMAGE));
        assert_eq!(
            n1.route(&request).await.unwrap(),
            Route::Forward(node("n2")),
            "{op:?}"
        );
        assert_eq!(n2.route(&request).await.unwrap(), Route::Here, "{op:?}");
    }
}

#[tokio::test]
async fn a_start_that_names_a_node_is_placed_there_unless_it_cannot_be() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let _n2 = worker_of(&db, "n2", 2).await;
    running_on(&db, "n2", 1).await;
    let named = |game: &GameId, on: &str| {
        let mut r = start(game);
        r.node = Some(on.into());
        r
    };
    let game = fresh_game();
    assert_eq!(
        n1.route(&named(&game, "n2")).await.unwrap(),
        Route::Forward(node("n2")),
        "n2 has fewer games than its limit"
    );
    // n2 now holds 2 of 2 (one running, one placed): full.
    let (code, message) = refused(n1.route(&named(&fresh_game(), "n2")).await.unwrap());
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert!(message.contains("\"n2\" is full"), "{message}");
    let (code, message) = refused(n1.route(&named(&fresh_game(), "n9")).await.unwrap());
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(message.contains("\"n9\" is unknown"), "{message}");
    sqlx::query("update nodes set draining = true where name = 'n1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, message) = refused(n1.route(&named(&fresh_game(), "n1")).await.unwrap());
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert!(message.contains("\"n1\" is draining"), "{message}");
}

#[tokio::test]
async fn no_room_when_every_node_is_full_draining_or_not_live() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 2).await;
    let _n2 = worker_of(&db, "n2", 200).await;
    let _n3 = worker_of(&db, "n3", 200).await;
    running_on(&db, "n1", 2).await;
    sqlx::query("update nodes set draining = true where name = 'n2'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update nodes set last_seen = now() - interval '1 minute' where name = 'n3'")
        .execute(&db.pool)
        .await
        .unwrap();
    let game = fresh_game();
    let (code, message) = refused(n1.route(&start(&game)).await.unwrap());
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert!(message.starts_with("no node has room"), "{message}");
    assert_eq!(placed(&db, &game).await, None, "nothing placed");
    // n3 comes back: the next start goes there.
    worker_of(&db, "n3", 200).await;
    assert_eq!(
        n1.route(&start(&game)).await.unwrap(),
        Route::Forward(node("n3"))
    );
}

#[tokio::test]
async fn a_removed_game_is_placed_afresh_its_old_node_first() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let _n2 = worker_of(&db, "n2", 200).await;
    running_on(&db, "n1", 4).await;
    let game = fresh_game();
    // It ran on n1 and was removed there (its state directory is on n1).
    sqlx::query(
        "insert into placements (game_id, node, command_id, placed_at)
         values ($1, 'n1', 'old-start', now() - interval '1 hour');
         ",
    )
    .bind(game.as_str())
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into runtime_records (game_id, status, current_image_ref, state_dir, fence, node)
         values ($1, 'removed', $2, '/tmp/x', 3, 'n1')",
    )
    .bind(game.as_str())
    .bind(IMAGE)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        n1.route(&start(&game)).await.unwrap(),
        Route::Here,
        "back on n1, though n2 has fewer games"
    );
    // n1 draining: the removed game's next life goes to n2.
    sqlx::query("update nodes set draining = true where name = 'n1'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update runtime_records set updated_at = now() where game_id = $1")
        .bind(game.as_str())
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        n1.route(&start(&game)).await.unwrap(),
        Route::Forward(node("n2"))
    );
}

/// Two workers placing 40 new games at once on two nodes of 10 games
/// each: exactly 20 placed, 10 per node, the rest refused — the advisory
/// lock serializes the choices, and a placement not yet started counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placements_made_at_once_never_overfill_a_node() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 10).await;
    let n2 = worker_of(&db, "n2", 10).await;
    let mut asks = Vec::new();
    for i in 0..40 {
        let store = if i % 2 == 0 { n1.clone() } else { n2.clone() };
        asks.push(tokio::spawn(async move {
            store.route(&start(&fresh_game())).await.unwrap()
        }));
    }
    let mut refusals = 0;
    for ask in asks {
        if let Route::Refused(f) = ask.await.unwrap() {
            assert_eq!(f.code, ErrorCode::ServiceUnavailable);
            refusals += 1;
        }
    }
    assert_eq!(refusals, 20);
    let per_node: Vec<(String, i64)> =
        sqlx::query_as("select node, count(*) from placements group by node order by node")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(per_node, [("n1".into(), 10), ("n2".into(), 10)]);
}

/// Copies of one start routed at the same moment by both nodes' workers
/// agree on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_a_start_routed_at_once_agree() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let n2 = worker_of(&db, "n2", 200).await;
    for _ in 0..20 {
        let request = start(&fresh_game());
        let (a, b) = tokio::join!(n1.route(&request), n2.route(&request));
        let on = |route: Route, me: &str| match route {
            Route::Here => me.to_owned(),
            Route::Forward(n) => n.to_string(),
            Route::Refused(f) => panic!("{f:?}"),
        };
        assert_eq!(on(a.unwrap(), "n1"), on(b.unwrap(), "n2"));
    }
}

#[tokio::test]
async fn the_first_node_takes_the_records_written_before_nodes() {
    let db = TestDb::new().await;
    let game = fresh_game();
    sqlx::query(
        "insert into runtime_records (game_id, status, current_image_ref,
             current_container_id, state_dir, fence)
         values ($1, 'running', $2, 'c', '/tmp/x', 1)",
    )
    .bind(game.as_str())
    .bind(IMAGE)
    .execute(&db.pool)
    .await
    .unwrap();
    let n1 = worker_of(&db, "n1", 200).await;
    assert_eq!(n1.adopt_unplaced(&node("n1")).await.unwrap(), 1);
    let n2 = worker_of(&db, "n2", 200).await;
    let stop = command_request(OpKind::Stop, &game, None);
    assert_eq!(n2.route(&stop).await.unwrap(), Route::Forward(node("n1")));
    // A second node never takes a record it cannot know is its own.
    sqlx::query("update runtime_records set node = null")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(n2.adopt_unplaced(&node("n2")).await.unwrap(), 0);
}

/// Runs the real `rtmanager` with `args` against `db`; returns its exit
/// code, stdout and stderr.
fn cli(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rtmanager"))
        .args(args)
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("RTM_NODE", "n1")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run rtmanager");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `rtmanager nodes`, `drain` and `undrain` (SPEC §8, §12) on a real
/// database: what they print, what they change, their exit statuses, and
/// that a drain outlives the node's heartbeats and steers placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_drain_and_undrain_from_the_command_line() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let n2 = worker_of(&db, "n2", 50).await;
    running_on(&db, "n1", 2).await;
    let (code, out, err) = cli(&db, &["nodes", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["name"], "n1");
    assert_eq!(rows[0]["games"], 2);
    assert_eq!(rows[0]["live"], true);
    assert_eq!(rows[1]["max_games"], 50);
    assert_eq!(rows[1]["draining"], false);

    let (code, out, err) = cli(&db, &["drain", "n1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("n1 is draining"), "{out}");
    // The node's next heartbeat keeps the operator's drain.
    worker_of(&db, "n1", 200).await;
    let (_, table, _) = cli(&db, &["nodes"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("n1") && l.contains("draining")),
        "{table}"
    );
    assert_eq!(
        n1.route(&start(&fresh_game())).await.unwrap(),
        Route::Forward(node("n2")),
        "no new game on a draining node"
    );

    let mut named = start(&fresh_game());
    named.node = Some("n1".into());
    let (code, _) = refused(n2.route(&named).await.unwrap());
    assert_eq!(code, ErrorCode::ServiceUnavailable);

    let (code, _, err) = cli(&db, &["drain", "n9"]);
    assert_eq!(code, 1, "an unknown node");
    assert!(err.contains("\"n9\" is unknown"), "{err}");
    let (code, _, err) = cli(&db, &["drain", "a b"]);
    assert_eq!(code, 2, "not a node name: {err}");

    let (code, out, err) = cli(&db, &["undrain", "n1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("n1 takes new games again"), "{out}");
    let mut named = start(&fresh_game());
    named.node = Some("n1".into());
    assert_eq!(
        n2.route(&named).await.unwrap(),
        Route::Forward(node("n1")),
        "a start naming n1 is placed there again (refused while it drained)"
    );
}

/// The claim `admission` carries; panics when it carries none.
fn claim_of(admission: &Admission) -> &InboxClaim {
    admission
        .claim
        .as_ref()
        .unwrap_or_else(|| panic!("expected a claim, got {admission:?}"))
}

/// `rtm_admit` (migration 0013) routes exactly as `rtm_route` and, in the
/// same call, claims every command answered here (placed here, or refused
/// placement), never one forwarded: its node claims that one.
#[tokio::test]
async fn admit_routes_as_route_does_and_claims_only_what_runs_here() {
    let db = TestDb::new().await;
    let n1 = worker_of(&db, "n1", 200).await;
    let n2 = worker_of(&db, "n2", 200).await;
    running_on(&db, "n1", 2).await;

    // Placed on n2 (fewer games): forwarded from n1, not claimed there.
    let game = fresh_game();
    let request = start(&game);
    let admitted = n1.admit(&request).await.unwrap();
    assert_eq!(admitted.route, Route::Forward(node("n2")));
    assert_eq!(admitted.claim, None, "a forwarded command is not claimed");
    assert_eq!(n1.lookup(&request).await.unwrap(), InboxClaim::Fresh);
    assert_eq!(placed(&db, &game).await.as_deref(), Some("n2"));

    // On n2 the same command runs here and is claimed once.
    let admitted = n2.admit(&request).await.unwrap();
    assert_eq!(admitted.route, Route::Here);
    assert_eq!(claim_of(&admitted), &InboxClaim::Fresh);
    let again = n2.admit(&request).await.unwrap();
    assert_eq!(again.route, Route::Here);
    assert_eq!(claim_of(&again), &InboxClaim::Unfinished, "a copy");

    // The command_id reused for another command: refused as a reuse.
    let mut reused = command_request(OpKind::Stop, &game, None);
    reused.command_id = request.command_id.clone();
    let admitted = n2.admit(&reused).await.unwrap();
    assert!(
        matches!(claim_of(&admitted), InboxClaim::Reused { .. }),
        "{admitted:?}"
    );

    // A start refused placement is answered here: claimed here.
    let mut unknown = start(&fresh_game());
    unknown.node = Some("n9".into());
    let admitted = n1.admit(&unknown).await.unwrap();
    assert_eq!(refused(admitted.route.clone()).0, ErrorCode::InvalidRequest);
    assert_eq!(claim_of(&admitted), &InboxClaim::Fresh);

    // A command with no usable game_id asks no route: claimed here.
    let mut nameless = start(&fresh_game());
    nameless.game_id = Some("not a game id!".into());
    let admitted = n1.admit(&nameless).await.unwrap();
    assert_eq!(admitted.route, Route::Here);
    assert_eq!(claim_of(&admitted), &InboxClaim::Fresh);

    // The route matches rtm_route's for every op of a placed game.
    for op in [OpKind::Stop, OpKind::Restart, OpKind::Patch, OpKind::Remove] {
        let request = command_request(op, &game, Some(IMAGE));
        let admitted = n1.admit(&request).await.unwrap();
        assert_eq!(admitted.route, n1.route(&request).await.unwrap(), "{op:?}");
        assert_eq!(admitted.route, Route::Forward(node("n2")), "{op:?}");
        assert_eq!(admitted.claim, None, "{op:?}");
    }
}

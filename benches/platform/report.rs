//! The table: each rtmanager figure beside its floor from the same run,
//! with the ratio and the target; and BENCH.md around it.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    /// No target, or no figure to judge.
    NotApplicable,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub measure: String,
    pub rtm: String,
    pub floor: String,
    pub ratio: String,
    pub target: String,
    pub met: Met,
    /// Why a missed target is out of reach in this run, from its figures.
    pub why: Option<String>,
}

impl Row {
    pub fn new(measure: impl Into<String>) -> Self {
        Self {
            measure: measure.into(),
            rtm: "—".into(),
            floor: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            met: Met::NotApplicable,
            why: None,
        }
    }

    pub fn why(mut self, why: Option<String>) -> Self {
        self.why = why;
        self
    }

    pub fn rtm(mut self, v: impl Into<String>) -> Self {
        self.rtm = v.into();
        self
    }

    pub fn floor(mut self, v: impl Into<String>) -> Self {
        self.floor = v.into();
        self
    }

    pub fn ratio(mut self, v: Option<f64>) -> Self {
        if let Some(r) = v {
            self.ratio = format!("{r:.2}");
        }
        self
    }

    /// The target and whether it was met (`None`: no figure to judge).
    pub fn target(mut self, target: impl Into<String>, met: Option<bool>) -> Self {
        self.target = target.into();
        self.met = match met {
            Some(true) => Met::Yes,
            Some(false) => Met::No,
            None => Met::NotApplicable,
        };
        self
    }
}

pub fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v >= 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.2} ms"),
        None => "n/a".into(),
    }
}

pub fn secs(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.1} s"))
}

pub fn rate(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.0} /s"))
}

pub fn mib(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.1} MiB"))
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| measure | rtmanager | floor | ratio | target | met |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for r in rows {
        let met = match r.met {
            Met::Yes => "yes",
            Met::No => "**NO**",
            Met::NotApplicable => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.measure, r.rtm, r.floor, r.ratio, r.target, met
        );
    }
    out
}

pub struct Document<'a> {
    pub title: &'a str,
    pub header: &'a [String],
    pub rows: &'a [Row],
    pub notes: &'a [String],
    pub method: &'a [String],
}

impl Document<'_> {
    pub fn markdown(&self) -> String {
        let mut out = format!("# {}\n\n", self.title);
        for line in self.header {
            let _ = writeln!(out, "- {line}");
        }
        out.push('\n');
        out.push_str(&table(self.rows));
        out.push('\n');
        let missed: Vec<&Row> = self.rows.iter().filter(|r| r.met == Met::No).collect();
        if missed.is_empty() {
            out.push_str("Every target with a figure in this run was met.\n\n");
        } else {
            out.push_str("## Targets not met in this run\n\n");
            for r in missed {
                let against = if r.ratio == "—" {
                    String::new()
                } else {
                    format!(", {} × the floor ({})", r.ratio, r.floor)
                };
                let why = r
                    .why
                    .as_ref()
                    .map_or(String::new(), |w| format!(" Why: {w}."));
                let _ = writeln!(
                    out,
                    "- **{}**: {}{against}; the target is {} — not met.{why}",
                    r.measure, r.rtm, r.target
                );
            }
            out.push('\n');
        }
        if !self.notes.is_empty() {
            out.push_str("## Observations of this run\n\n");
            for n in self.notes {
                let _ = writeln!(out, "- {n}");
            }
            out.push('\n');
        }
        out.push_str("## Method\n\n");
        for m in self.method {
            let _ = writeln!(out, "- {m}");
        }
        out
    }
}

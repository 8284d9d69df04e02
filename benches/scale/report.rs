//! The bench's figures: one table on stdout and `target/bench/report.json`.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// One measured figure next to its goal.
pub struct Figure {
    /// Stable key for the JSON report, e.g. `restart_api_writes`.
    pub key: &'static str,
    /// What the table shows in its first column.
    pub name: String,
    /// The number compared with the goal (seconds, bytes, counts, ratios), if there is one.
    pub value: Option<f64>,
    pub unit: &'static str,
    /// The table's "measured" column.
    pub shown: String,
    /// The table's "goal" column; `-` for figures only reported.
    pub goal: String,
    /// Whether the goal was met; None when there is no goal.
    pub met: Option<bool>,
    /// Whether a miss fails the run (the deterministic counts, in the small mode).
    pub asserted: bool,
    /// Everything else worth keeping: samples, breakdowns.
    pub details: Value,
}

impl Figure {
    pub fn new(key: &'static str, name: impl Into<String>) -> Figure {
        Figure {
            key,
            name: name.into(),
            value: None,
            unit: "",
            shown: String::new(),
            goal: "-".into(),
            met: None,
            asserted: false,
            details: Value::Null,
        }
    }

    pub fn value(mut self, value: f64, unit: &'static str, shown: impl Into<String>) -> Figure {
        self.value = Some(value);
        self.unit = unit;
        self.shown = shown.into();
        self
    }

    pub fn shown(mut self, shown: impl Into<String>) -> Figure {
        self.shown = shown.into();
        self
    }

    pub fn goal(mut self, goal: impl Into<String>, met: bool) -> Figure {
        self.goal = goal.into();
        self.met = Some(met);
        self
    }

    pub fn asserted(mut self, asserted: bool) -> Figure {
        self.asserted = asserted;
        self
    }

    pub fn details(mut self, details: Value) -> Figure {
        self.details = details;
        self
    }

    /// A figure whose goal is a count that must hold, and which the small mode asserts.
    pub fn failed_assertion(&self) -> bool {
        self.asserted && self.met == Some(false)
    }

    fn met_text(&self) -> &'static str {
        match (self.met, self.asserted) {
            (None, _) => "-",
            (Some(true), _) => "yes",
            (Some(false), true) => "NO (asserted)",
            (Some(false), false) => "no",
        }
    }
}

/// The table, as plain text with aligned columns.
pub fn table(figures: &[Figure]) -> String {
    let rows: Vec<[String; 4]> = figures
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                f.shown.clone(),
                f.goal.clone(),
                f.met_text().to_string(),
            ]
        })
        .collect();
    let header = [
        "figure".to_string(),
        "measured".to_string(),
        "goal".to_string(),
        "met?".to_string(),
    ];
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String; 4]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let rule = format!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    let mut out = vec![line(&header), rule];
    out.extend(rows.iter().map(line));
    out.join("\n")
}

/// The machine the figures come from.
pub fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let arch = std::process::Command::new("uname")
        .arg("-m")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    json!({
        "cores": cores,
        "arch": arch,
        "cpu_model": cpu,
        "memory_mib": mem_kib.map(|k| k / 1024),
    })
}

/// Writes the JSON report (every figure with its goal, plus `extra` at the top level).
pub fn write_json(path: &Path, figures: &[Figure], mut extra: serde_json::Map<String, Value>) -> Result<()> {
    let figures: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({
                "key": f.key,
                "figure": f.name,
                "value": f.value,
                "unit": f.unit,
                "measured": f.shown,
                "goal": f.goal,
                "met": f.met,
                "asserted": f.asserted,
                "details": f.details,
            })
        })
        .collect();
    extra.insert("figures".into(), Value::Array(figures));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&Value::Object(extra))?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// The value at quantile `q` (0..=1) of `samples`, nearest rank; None when empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// The median: the mean of the two middle values for an even count.
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// `1234567` -> `1,234,567`: sizes and counts are easier to read with separators.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

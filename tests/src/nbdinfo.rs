//! `nbdinfo` (libnbd-bin) as a typed oracle: export flags and block-status maps.

use serde::Deserialize;
use serde_json::Value;

use crate::{parse_json, run, tool};

/// The single export `nbdinfo --json URI` describes (its members as nbdinfo names them:
/// `export-size`, `is_read_only`, `can_trim`, `block_size_minimum`, `contexts`, …).
#[track_caller]
pub fn export_info(uri: &str) -> Value {
    let out = run(tool("nbdinfo").arg("--json").arg(uri));
    let doc = parse_json("nbdinfo --json", &out.stdout);
    let exports =
        doc["exports"].as_array().unwrap_or_else(|| panic!("nbdinfo --json {uri}: no exports: {doc}"));
    assert_eq!(exports.len(), 1, "nbdinfo --json {uri} should describe exactly one export: {doc}");
    exports[0].clone()
}

/// The whole document `nbdinfo --list --json URI` prints.
#[track_caller]
pub fn list(uri: &str) -> Value {
    let out = run(tool("nbdinfo").args(["--list", "--json"]).arg(uri));
    parse_json("nbdinfo --list --json", &out.stdout)
}

/// One block-status extent: `kind` is the context's flags (`type` in nbdinfo's JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    #[serde(rename = "type")]
    pub kind: u64,
}

impl Extent {
    pub fn new(offset: u64, length: u64, kind: u64) -> Extent {
        Extent { offset, length, kind }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// `nbdinfo --map[=CONTEXT] --json URI`, as returned by the server (unmerged), after checking
/// that the extents tile `0..export_size` without gaps or overlaps.
pub fn map(uri: &str, context: Option<&str>, export_size: u64) -> Vec<Extent> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_owned(),
    };
    let out = run(tool("nbdinfo").arg(&flag).arg("--json").arg(uri));
    let extents = parse_extents(&format!("nbdinfo {flag} --json"), &out.stdout);
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos, "nbdinfo {flag}: extents do not tile the export: {extents:?}");
        assert!(e.length > 0, "nbdinfo {flag}: zero-length extent: {extents:?}");
        pos = e.end();
    }
    assert_eq!(pos, export_size, "nbdinfo {flag}: extents do not cover the export: {extents:?}");
    extents
}

/// The extents of a map printed as JSON (`nbdinfo --map --json`), in order.
#[track_caller]
pub fn parse_extents(what: &str, stdout: &[u8]) -> Vec<Extent> {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what} printed no list of extents ({e}):\n{text}"))
}

/// Merges adjacent extents of the same kind (servers may legitimately split runs anywhere).
pub fn merge(extents: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &e in extents {
        match out.last_mut() {
            Some(last) if last.kind == e.kind && last.end() == e.offset => last.length += e.length,
            _ => out.push(e),
        }
    }
    out
}

/// The full map of `0..size` in which exactly `marked` (any order, overlapping allowed) have
/// kind `on`, each rounded out to `granularity`, and everything else has kind `off`; merged.
pub fn expected_map(size: u64, granularity: u64, marked: &[(u64, u64)], on: u64, off: u64) -> Vec<Extent> {
    let mut spans: Vec<(u64, u64)> = marked
        .iter()
        .filter(|&&(_, len)| len > 0)
        .map(|&(off, len)| (off / granularity * granularity, (off + len).div_ceil(granularity) * granularity))
        .map(|(start, end)| (start, end.min(size)))
        .collect();
    spans.sort_unstable();
    let mut out = Vec::new();
    let mut pos = 0;
    for (start, end) in spans {
        if end <= pos {
            continue;
        }
        let start = start.max(pos);
        if start > pos {
            out.push(Extent::new(pos, start - pos, off));
        }
        out.push(Extent::new(start, end - start, on));
        pos = end;
    }
    if pos < size {
        out.push(Extent::new(pos, size - pos, off));
    }
    merge(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_map_rounds_and_merges() {
        let m = expected_map(65536, 4096, &[(513, 512), (4096, 1), (60000, 10000)], 1, 0);
        assert_eq!(
            m,
            vec![Extent::new(0, 8192, 1), Extent::new(8192, 57344 - 8192, 0), Extent::new(57344, 8192, 1)]
        );
        assert_eq!(expected_map(8192, 4096, &[], 1, 0), vec![Extent::new(0, 8192, 0)]);
    }
}

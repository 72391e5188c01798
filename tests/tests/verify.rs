//! `siterep verify` on a real store: a clean store exits 0; a flipped byte in a chunk exits 1
//! and the human and JSON reports name the chunk, the points that depend on it and the disk
//! ranges; a store that cannot be opened exits 2.

use std::path::{Path, PathBuf};
use std::process::Output;

use server::{Consistency, GenerationKind, Store};
use siterep_tests::{
    json_array, json_str, json_u64, parse_json, run_unchecked, scratch_dir, show_output, siterep,
    COMMAND_TIMEOUT,
};

const DISK: &str = "vol1";

fn put(store: &Store, data: &[u8]) -> [u8; 32] {
    let hash = *blake3::hash(data).as_bytes();
    store.put_chunk(&hash, data.len() as u32, &zstd::bulk::compress(data, 1).unwrap()).unwrap();
    hash
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A store with two points of a 1 MiB disk: point 1 has chunk `a` (64 KiB at 128 KiB) and `b`
/// (32 KiB at 512 KiB); point 2 overwrites `b`'s range with `c`. Returns the store's directory
/// and the chunks.
fn make_store(dir: &Path) -> (PathBuf, [[u8; 32]; 3]) {
    let root = dir.join("store");
    let store = Store::open(&root).unwrap();
    store.register_disk(DISK, 1 << 20, 4096).unwrap();
    let bytes =
        |seed: u8, n: usize| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect() };
    let mut p = store.begin(DISK, 1, GenerationKind::InitialFull, None).unwrap();
    let a = put(&store, &bytes(1, 64 << 10));
    p.add_chunk(128 << 10, 64 << 10, a).unwrap();
    let b = put(&store, &bytes(2, 32 << 10));
    p.add_chunk(512 << 10, 32 << 10, b).unwrap();
    p.commit(1, Consistency::Crash).unwrap();
    let mut p = store.begin(DISK, 2, GenerationKind::Incremental, Some(1)).unwrap();
    let c = put(&store, &bytes(3, 32 << 10));
    p.add_chunk(512 << 10, 32 << 10, c).unwrap();
    p.commit(2, Consistency::Crash).unwrap();
    (root, [a, b, c])
}

fn verify(root: &Path, extra: &[&str]) -> Output {
    run_unchecked(siterep().arg("verify").arg("--store").arg(root).args(extra), COMMAND_TIMEOUT)
}

#[test]
fn verify_names_a_damaged_chunk_and_the_points_and_ranges_that_depend_on_it() {
    let dir = scratch_dir("verify");
    let (root, [a, b, c]) = make_store(dir.path());
    let out = verify(&root, &[]);
    assert_eq!(out.status.code(), Some(0), "a clean store\n{}", show_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no damage found"), "{}", show_output(&out));

    // One flipped byte in chunk `a`, named by both points.
    let path = root.join("chunks").join(&hex(&a)[..2]).join(hex(&a));
    let mut data = std::fs::read(&path).unwrap();
    let n = data.len();
    data[n / 2] ^= 0x40;
    std::fs::write(&path, data).unwrap();

    let out = verify(&root, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show_output(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("DAMAGED chunk {}", hex(&a))), "{}", show_output(&out));
    for point in [1, 2] {
        assert!(
            text.contains(&format!("disk {DISK} point {point}: bytes 131072+65536")),
            "point {point}\n{}",
            show_output(&out)
        );
    }
    assert!(!text.contains(&hex(&b)) && !text.contains(&hex(&c)), "{}", show_output(&out));

    // JSON: the same, and stable field names. The chunk is quarantined by now.
    let out = verify(&root, &["--disk", DISK, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show_output(&out));
    let report = parse_json("siterep verify --json", &out.stdout);
    assert_eq!(json_str(&report, "format"), "siterep.verify");
    let damaged = json_array(&report, "damaged");
    assert_eq!(damaged.len(), 1, "{}", show_output(&out));
    let d = &damaged[0];
    assert_eq!(json_str(d, "kind"), "chunk");
    assert_eq!(json_str(d, "object"), hex(&a));
    assert_eq!(d["quarantined"], true);
    let deps = json_array(d, "dependents");
    assert_eq!(deps.len(), 2);
    for (dep, point) in deps.iter().zip([1, 2]) {
        assert_eq!(json_str(dep, "disk"), DISK);
        assert_eq!(json_u64(dep, "point"), point);
        let ranges = json_array(dep, "ranges");
        assert_eq!(ranges.len(), 1);
        assert_eq!(ranges[0], serde_json::json!([128 << 10, 64 << 10]));
    }
    let points = json_array(&report, "points");
    assert!(points.iter().all(|p| p["intact"] == false), "{}", show_output(&out));

    // Only point 2 of the disk: the same chunk, one dependent.
    let out = verify(&root, &["--disk", DISK, "--point", "2", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show_output(&out));
    let report = parse_json("siterep verify --json", &out.stdout);
    assert_eq!(json_array(&json_array(&report, "damaged")[0], "dependents").len(), 1);

    // No store: exit 2.
    let out = verify(&dir.path().join("nothing"), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show_output(&out));
}

//! The handshake as real clients see it: advertised flags, meta contexts, sizes, export names,
//! read-only exports and the TCP listener.

use siterep_tests::image::{self, MIB};
use siterep_tests::nbdinfo::{self, Extent};
use siterep_tests::{
    json_array, json_str, json_u64, parse_json, run, run_expect_failure, scratch_dir, tool, Serve,
};

const SIZE: u64 = 64 * MIB;

/// Every capability the server promises, as `nbdinfo --json` reports it.
#[test]
fn nbdinfo_reports_capabilities_contexts_and_size() {
    let dir = scratch_dir("caps");
    let img = dir.path().join("disk.img");
    // An odd size (not a multiple of 4096) must be reported exactly.
    let size = SIZE + 512 + 1;
    image::create_sparse(&img, size);
    let server = Serve::new(&img).start();

    let info = nbdinfo::export_info(&server.uri());
    for flag in
        ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_cache"]
    {
        assert_eq!(info[flag], true, "{flag} should be true: {info:?}");
    }
    assert_eq!(info["is_read_only"], false, "writable export reported read-only: {info:?}");
    assert_eq!(json_u64(&info, "export-size"), size, "export size: {info:?}");
    assert_eq!(json_u64(&info, "block_size_maximum"), 64 * MIB, "max block size: {info:?}");
    assert_eq!(json_u64(&info, "block_size_minimum"), 1, "min block size without --direct: {info:?}");
    let preferred = json_u64(&info, "block_size_preferred");
    assert!(
        preferred.is_power_of_two() && (1..=32 * MIB).contains(&preferred),
        "preferred block size {preferred} should be a power of two within [min, max]"
    );

    // The contexts list comes from NBD_OPT_LIST_META_CONTEXT.
    let contexts: Vec<&str> =
        json_array(&info, "contexts").iter().map(|c| c.as_str().expect("a context name")).collect();
    for ctx in ["base:allocation", "qemu:dirty-bitmap:live"] {
        assert!(contexts.contains(&ctx), "context {ctx} not advertised: {contexts:?}");
    }
    // Structured replies are negotiated (block status needs them).
    let doc = parse_json("nbdinfo --json", &run(tool("nbdinfo").arg("--json").arg(server.uri())).stdout);
    assert_eq!(doc["structured"], true, "structured replies not negotiated: {doc:?}");

    // nbdinfo --can / --is exit 0 for true and 2 for false.
    for can in ["flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "cache", "structured-reply"] {
        run(tool("nbdinfo").args(["--can", can]).arg(server.uri()));
    }
    let out = tool("nbdinfo").args(["--is", "read-only"]).arg(server.uri()).output().expect("run nbdinfo");
    assert_eq!(out.status.code(), Some(2), "nbdinfo --is read-only should say false (exit 2)");

    // `--size` agrees, and the list mode shows the same export.
    let out = run(tool("nbdinfo").arg("--size").arg(server.uri()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), size.to_string());
    let listed = nbdinfo::list(&server.uri());
    let exports = json_array(&listed, "exports");
    assert!(!exports.is_empty(), "nbdinfo --list shows no exports: {listed:?}");
    let names: Vec<&str> = exports.iter().map(|e| json_str(e, "export-name")).collect();
    assert!(names.contains(&"siterep"), "NBD_OPT_LIST should name the export \"siterep\": {names:?}");
    for export in exports {
        let contexts: Vec<&str> =
            json_array(export, "contexts").iter().map(|c| c.as_str().expect("a context name")).collect();
        for ctx in ["base:allocation", "qemu:dirty-bitmap:live"] {
            assert!(contexts.contains(&ctx), "listed export lacks context {ctx}: {export:?}");
        }
        assert_eq!(json_u64(export, "export-size"), size);
    }
    server.stop();
}

/// `--read-only` is advertised, and the write-type capabilities are withdrawn with it.
#[test]
fn read_only_export_reports_read_only() {
    let dir = scratch_dir("ro-caps");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).read_only().start();

    let info = nbdinfo::export_info(&server.uri());
    assert_eq!(info["is_read_only"], true, "--read-only export not reported read-only: {info:?}");
    for flag in ["can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(info[flag], false, "read-only export should not advertise {flag}: {info:?}");
    }
    run(tool("nbdinfo").args(["--is", "read-only"]).arg(server.uri()));
    assert_eq!(json_u64(&info, "export-size"), SIZE);
    // Block status still works on a read-only export.
    let map = nbdinfo::map(&server.uri(), None, SIZE);
    assert_eq!(nbdinfo::merge(&map), vec![Extent::new(0, SIZE, 3)], "a fully sparse image is one hole");
    server.stop();
}

/// With `--direct` the minimum block size is the device's logical block size, and unaligned
/// client I/O still works because clients honour it (qemu does read-modify-write).
#[test]
fn direct_io_advertises_block_size_and_serves_unaligned_clients() {
    let dir = scratch_dir("direct");
    let img = dir.path().join("disk.img");
    let mut expected = image::create_random(&img, 16 * MIB, 11);
    let server = Serve::new(&img).direct().start();

    let info = nbdinfo::export_info(&server.uri());
    let min = json_u64(&info, "block_size_minimum");
    assert!(min == 512 || min == 4096, "--direct min block size should be 512 or 4096, got {min}");
    assert_eq!(json_u64(&info, "block_size_maximum"), 64 * MIB);

    run(tool("qemu-io").args(["-f", "raw", &server.uri()]).args([
        "-c",
        "write -P 0x5c 513 1000",
        "-c",
        "read -P 0x5c 513 1000",
        "-c",
        "flush",
    ]));
    expected[513..1513].fill(0x5c);
    server.stop();
    image::assert_same_bytes("image after --direct writes", &image::read(&img), &expected);
}

/// The export answers to its name and to the empty name, and refuses any other.
#[test]
fn export_names_default_and_empty_work_unknown_fails() {
    let dir = scratch_dir("names");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).start();

    for name in ["siterep", ""] {
        let info = nbdinfo::export_info(&server.uri_for(name));
        // nbdinfo shows the canonical name (NBD_INFO_NAME) when the server sends one.
        let canonical = json_str(&info, "export-name");
        assert!(canonical == "siterep" || canonical == name, "export {name:?} reported as {canonical:?}");
        assert_eq!(json_u64(&info, "export-size"), SIZE, "export {name:?}");
    }
    for bad in ["nosuch", "siterep2", "SITEREP"] {
        let out = run_expect_failure(tool("nbdinfo").arg(server.uri_for(bad)));
        assert_eq!(out.status.code(), Some(1), "nbdinfo on unknown export {bad:?}");
    }
    // The server survives the refusals.
    nbdinfo::export_info(&server.uri());
    server.stop();
}

/// `--export NAME` renames the export: NAME and "" work, the default name no longer does.
#[test]
fn custom_export_name() {
    let dir = scratch_dir("name");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).export("disk0").start();

    for name in ["disk0", ""] {
        let info = nbdinfo::export_info(&server.uri_for(name));
        assert_eq!(json_u64(&info, "export-size"), SIZE, "export {name:?}");
    }
    run_expect_failure(tool("nbdinfo").arg(server.uri_for("siterep")));
    server.stop();
}

/// `--listen 127.0.0.1:PORT` serves the same export over TCP, data included.
#[test]
fn tcp_listener_serves_the_export() {
    let dir = scratch_dir("tcp");
    let img = dir.path().join("disk.img");
    let mut expected = image::create_random(&img, SIZE, 3);
    let server = Serve::new(&img).listen_tcp().start();

    for name in ["", "siterep"] {
        let info = nbdinfo::export_info(&server.tcp_uri_for(name));
        assert_eq!(json_u64(&info, "export-size"), SIZE, "TCP export {name:?}");
        assert_eq!(info["can_multi_conn"], true);
    }
    run(tool("qemu-io").args(["-f", "raw", &server.tcp_uri_for("siterep")]).args([
        "-c",
        "write -P 0x77 1000000 70000",
        "-c",
        "read -P 0x77 1000000 70000",
        "-c",
        "flush",
    ]));
    expected[1_000_000..1_070_000].fill(0x77);
    // The Unix socket still works while TCP is open.
    run(tool("qemu-io").args(["-f", "raw", "-r", &server.uri()]).args(["-c", "read -P 0x77 1000000 70000"]));
    server.stop();
    image::assert_same_bytes("image after TCP writes", &image::read(&img), &expected);
}

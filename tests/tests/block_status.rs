//! Block status as real clients read it: the `qemu:dirty-bitmap:live` context (the tracker's
//! dirty set) and `base:allocation` (the image file's holes).

use siterep_tests::image::{self, Run, GIB, MIB};
use siterep_tests::nbdinfo::{self, expected_map, Extent};
use siterep_tests::{nbdsh, run, scratch_dir, show_output, tool, Serve, Server};

const SIZE: u64 = 64 * MIB;
const DIRTY: &str = "qemu:dirty-bitmap:live";

/// One NBD command sent verbatim by nbdsh (libnbd), so the server sees exactly these extents.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64),
    WriteFua(u64, u64),
    Trim(u64, u64),
    Zero(u64, u64),
    ZeroNoHole(u64, u64),
    Read(u64, u64),
    Cache(u64, u64),
    Flush,
}

impl Op {
    fn python(self) -> String {
        match self {
            Op::Write(off, len) => format!("h.pwrite(b'\\x5a' * {len}, {off})"),
            Op::WriteFua(off, len) => format!("h.pwrite(b'\\xa5' * {len}, {off}, nbd.CMD_FLAG_FUA)"),
            Op::Trim(off, len) => format!("h.trim({len}, {off})"),
            Op::Zero(off, len) => format!("h.zero({len}, {off})"),
            Op::ZeroNoHole(off, len) => format!("h.zero({len}, {off}, nbd.CMD_FLAG_NO_HOLE)"),
            Op::Read(off, len) => format!("h.pread({len}, {off})"),
            Op::Cache(off, len) => format!("h.cache({len}, {off})"),
            Op::Flush => "h.flush()".to_owned(),
        }
    }

    /// The extent this command changes (and so must mark dirty), if any.
    fn modifies(self) -> Option<(u64, u64)> {
        match self {
            Op::Write(off, len)
            | Op::WriteFua(off, len)
            | Op::Trim(off, len)
            | Op::Zero(off, len)
            | Op::ZeroNoHole(off, len) => Some((off, len)),
            Op::Read(..) | Op::Cache(..) | Op::Flush => None,
        }
    }
}

/// Sends `ops` in order over one connection, each awaited before the next.
fn send(server: &Server, ops: &[Op]) {
    let script: Vec<String> = ops.iter().map(|op| op.python()).collect();
    run(nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(script.join("\n")));
}

/// Asserts the dirty map nbdinfo reads equals exactly `ops`' extents rounded out to
/// `granularity` (dirty = 1), clean (0) elsewhere.
#[track_caller]
fn assert_dirty_map(server: &Server, size: u64, granularity: u64, ops: &[Op]) {
    let marked: Vec<(u64, u64)> = ops.iter().filter_map(|op| op.modifies()).collect();
    let expected = expected_map(size, granularity, &marked, 1, 0);
    let actual = nbdinfo::merge(&nbdinfo::map(&server.uri(), Some(DIRTY), size));
    assert_eq!(
        actual, expected,
        "dirty map (merged) after {ops:?} at granularity {granularity}\n  actual:   {actual:?}\n  expected: {expected:?}"
    );
}

/// Writes that do and do not cross 4 KiB blocks, merged neighbours, the last byte, and commands
/// that must not dirty anything (read, cache, flush).
fn write_ops(size: u64) -> Vec<Op> {
    vec![
        Op::Write(513, 512),
        Op::Write(4096, 1), // adjacent block: merges with the first
        Op::WriteFua(MIB - 1, 2),
        Op::Write(10 * MIB, 64 * 1024),
        Op::Write(17 * MIB + 4095, 4098), // touches three blocks
        Op::Write(33 * MIB, 32 * MIB / 8),
        Op::Write(size - 1, 1),
        Op::Read(40 * MIB, 4 * MIB),
        Op::Cache(50 * MIB, MIB),
        Op::Flush,
    ]
}

#[test]
fn dirty_map_lists_exactly_the_written_blocks() {
    let dir = scratch_dir("dirty");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).start();

    // Fresh: nothing dirty.
    assert_dirty_map(&server, SIZE, 4096, &[]);
    let ops = write_ops(SIZE);
    send(&server, &ops);
    assert_dirty_map(&server, SIZE, 4096, &ops);
    // Reading the map does not change it.
    assert_dirty_map(&server, SIZE, 4096, &ops);
    server.stop();
}

#[test]
fn dirty_map_at_64k_granularity() {
    let dir = scratch_dir("dirty64k");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).granularity(65536).start();

    let ops = write_ops(SIZE);
    send(&server, &ops);
    assert_dirty_map(&server, SIZE, 65536, &ops);

    // A second client (qemu-io, its own connection) adds to the same map.
    run(tool("qemu-io").args(["-f", "raw", &server.uri()]).args([
        "-c",
        "write -P 0x11 20000000 1",
        "-c",
        "write -P 0x12 30000001 200000",
    ]));
    let mut all = ops.clone();
    all.extend([Op::Write(20_000_000, 1), Op::Write(30_000_001, 200_000)]);
    assert_dirty_map(&server, SIZE, 65536, &all);
    server.stop();
}

#[test]
fn trim_and_write_zeroes_mark_dirty() {
    let dir = scratch_dir("dirty-trim");
    let img = dir.path().join("disk.img");
    // Data everywhere, so trims and zeroes really change something.
    image::create_random(&img, SIZE, 21);
    let server = Serve::new(&img).start();

    let ops = [
        Op::Trim(20 * MIB, MIB),
        Op::Trim(30 * MIB + 100, 5000),
        Op::Zero(40 * MIB + 7, 10000),
        Op::ZeroNoHole(45 * MIB, 4096),
        Op::Zero(50 * MIB, 3 * MIB),
    ];
    send(&server, &ops);
    assert_dirty_map(&server, SIZE, 4096, &ops);

    // And through qemu-io's discard / write -z (each its own connection).
    run(tool("qemu-io").args(["-f", "raw", &server.uri()]).args([
        "-c",
        "write -z 2097152 65536",
        "-c",
        "write -z -u 4194304 1048576",
    ]));
    let mut all = ops.to_vec();
    all.extend([Op::Zero(2 * MIB, 65536), Op::Zero(4 * MIB, MIB)]);
    assert_dirty_map(&server, SIZE, 4096, &all);

    // Zeroed ranges read back as zeroes.
    run(tool("qemu-io").args(["-f", "raw", "-r", &server.uri()]).args([
        "-c",
        "read -P 0 41943047 10000",
        "-c",
        "read -P 0 52428800 3145728",
        "-c",
        "read -P 0 2097152 65536",
        "-c",
        "read -P 0 4194304 1048576",
    ]));
    server.stop();
}

#[test]
fn no_track_reports_nothing_dirty() {
    let dir = scratch_dir("notrack");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).no_track().start();

    let ops = write_ops(SIZE);
    send(&server, &ops);
    send(&server, &[Op::Trim(20 * MIB, MIB), Op::Zero(30 * MIB, MIB)]);
    let map = nbdinfo::merge(&nbdinfo::map(&server.uri(), Some(DIRTY), SIZE));
    assert_eq!(map, vec![Extent::new(0, SIZE, 0)], "--no-track must report no dirty block");
    server.stop();
}

/// Offsets past 4 GiB (a sparse 8 GiB export) land in the right place in the map.
#[test]
fn dirty_map_beyond_4gib() {
    let dir = scratch_dir("dirty8g");
    let img = dir.path().join("disk.img");
    let size = 8 * GIB;
    image::create_sparse(&img, size);
    let server = Serve::new(&img).start();

    let ops = [
        Op::Write(4 * GIB - 1, 2),
        Op::Write(6 * GIB + 12345, 100_000),
        Op::Zero(7 * GIB, 8 * MIB),
        Op::Write(size - 1, 1),
    ];
    send(&server, &ops);
    assert_dirty_map(&server, size, 4096, &ops);
    server.stop();
}

/// Both contexts negotiated at once: every NBD_CMD_BLOCK_STATUS answers for each, and
/// NBD_CMD_FLAG_REQ_ONE limits each answer to one extent within the request.
#[test]
fn both_contexts_in_one_block_status() {
    let dir = scratch_dir("twoctx");
    let img = dir.path().join("disk.img");
    image::create_with_data(&img, SIZE, &[(0, MIB)], 8);
    let server = Serve::new(&img).start();
    send(&server, &[Op::Write(2 * MIB, 4096)]);

    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.add_meta_context("{DIRTY}")
h.connect_uri({uri:?})
for ctx in ["base:allocation", "{DIRTY}"]:
    assert h.can_meta_context(ctx), ctx
def show(tag):
    def cb(ctx, off, entries, err):
        print(tag, ctx, off, " ".join(str(e) for e in entries))
        return 0
    return cb
h.block_status(4 * 1048576, 0, show("full"))
h.block_status(4 * 1048576, 0, show("one"), nbd.CMD_FLAG_REQ_ONE)
h.block_status(8192, 2 * 1048576 - 4096, show("mid"))
"#,
        uri = server.uri()
    );
    let out = run(nbdsh().arg("-c").arg(script));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let replies: Vec<(&str, &str, u64, Vec<u64>)> = text
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let tag = f.next().unwrap();
            let ctx = f.next().unwrap();
            let off = f.next().unwrap().parse().unwrap();
            (tag, ctx, off, f.map(|n| n.parse().unwrap()).collect())
        })
        .collect();
    // (length, flags) pairs as sent, and with adjacent equal flags merged.
    let get = |tag: &str, ctx: &str| -> Vec<(u64, u64)> {
        let r: Vec<_> = replies.iter().filter(|r| r.0 == tag && r.1 == ctx).collect();
        assert_eq!(r.len(), 1, "expected one {ctx} reply for the {tag:?} request\n{}", show_output(&out));
        assert!(r[0].3.len() >= 2 && r[0].3.len() % 2 == 0, "{ctx}: bad entries {:?}", r[0].3);
        r[0].3.chunks(2).map(|p| (p[0], p[1])).collect()
    };
    let merged = |pairs: Vec<(u64, u64)>| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (len, flags) in pairs {
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += len,
                _ => out.push((len, flags)),
            }
        }
        out
    };
    for ctx in ["base:allocation", DIRTY] {
        let one = get("one", ctx);
        assert_eq!(one.len(), 1, "{ctx}: REQ_ONE must return exactly one extent, got {one:?}");
        assert!(one[0].0 > 0 && one[0].0 <= 4 * MIB, "{ctx}: REQ_ONE extent {one:?} exceeds the request");
    }
    // base:allocation: [0, 1 MiB) is data, then a hole.
    let base = merged(get("full", "base:allocation"));
    assert_eq!(base[0], (MIB, 0), "first MiB should be one data run: {base:?}");
    assert_eq!(base.get(1).map(|e| e.1), Some(3), "hole after the first MiB: {base:?}");
    // Dirty: only [2 MiB, 2 MiB + 4 KiB).
    let dirty = merged(get("full", DIRTY));
    assert_eq!(&dirty[..2], &[(2 * MIB, 0), (4096, 1)], "dirty entries from 0: {dirty:?}");
    assert_eq!(get("one", DIRTY)[0].1, 0, "REQ_ONE dirty entry from 0 is clean");
    // A small request is answered in full.
    let mid = merged(get("mid", DIRTY));
    assert_eq!(&mid[..2], &[(4096, 0), (4096, 1)], "dirty entries from 2 MiB - 4 KiB: {mid:?}");
    server.stop();
}

/// `base:allocation` mirrors the image file's SEEK_DATA/SEEK_HOLE layout: holes (and zero) are
/// type 3, data type 0 — also after the client writes into holes and trims/zeroes data.
#[test]
fn base_allocation_matches_file_layout() {
    let dir = scratch_dir("alloc");
    let img = dir.path().join("disk.img");
    let data = [(0, MIB), (3 * MIB, 2 * MIB), (10 * MIB, MIB), (30 * MIB, 7 * MIB), (SIZE - MIB, MIB)];
    image::create_with_data(&img, SIZE, &data, 99);
    let layout = image::seek_layout(&img);
    // The filesystem must keep the layout we made, or this test checks nothing.
    let made: Vec<(u64, u64)> = layout.iter().filter(|r| r.data).map(|r| (r.offset, r.length)).collect();
    assert_eq!(made, data, "the scratch filesystem does not report holes via SEEK_HOLE: {layout:?}");

    let server = Serve::new(&img).start();
    assert_allocation_matches(&server, &img);

    // Change the layout through the server and compare again with what the file now says.
    run(tool("qemu-io").args(["-f", "raw", &server.uri()]).args([
        "-c",
        "write -P 0x33 20971520 1048576",
        "-c",
        "discard 31457280 2097152",
        "-c",
        "write -z -u 3145728 1048576",
        "-c",
        "flush",
    ]));
    assert_allocation_matches(&server, &img);
    server.stop();
}

#[track_caller]
fn assert_allocation_matches(server: &Server, img: &std::path::Path) {
    let layout = image::seek_layout(img);
    let expected: Vec<Extent> = nbdinfo::merge(
        &layout
            .iter()
            .map(|&Run { offset, length, data }| Extent::new(offset, length, if data { 0 } else { 3 }))
            .collect::<Vec<_>>(),
    );
    let actual = nbdinfo::merge(&nbdinfo::map(&server.uri(), None, SIZE));
    assert_eq!(actual, expected, "base:allocation vs SEEK_DATA/SEEK_HOLE of {}", img.display());
}

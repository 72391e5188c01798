//! Protocol corners through libnbd (nbdsh) with its client-side checks switched off, so the
//! server itself must refuse bad requests with the right errno, keep the stream in sync and
//! leave the image alone; plus simple (non-structured) replies, meta-context negotiation and
//! the largest requests.

use siterep_tests::image::{self, Rng, MIB};
use siterep_tests::{nbdsh, run, scratch_dir, show_output, Serve, Server};

const SIZE: u64 = 64 * MIB;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Python prelude: `attempt(name, f)` prints `name OK` or `name errno N`.
const ATTEMPT: &str = r#"
def attempt(name, f):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, "errno", e.errnum)
"#;

/// Runs an nbdsh script (not connected: the script connects) and returns `name -> outcome`
/// for each line `name OK` / `name errno N` it printed.
fn outcomes(script: &str) -> (Vec<(String, Option<u32>)>, String) {
    let out = run(nbdsh().arg("-c").arg(format!("{ATTEMPT}\n{script}")));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut results = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[..] {
            [name, "OK"] => results.push((name.to_owned(), None)),
            [name, "errno", n] => results.push((name.to_owned(), Some(n.parse().expect("errno")))),
            _ => {}
        }
    }
    (results, show_output(&out))
}

#[track_caller]
fn outcome(results: &[(String, Option<u32>)], name: &str, context: &str) -> Option<u32> {
    results.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no outcome for {name}\n{context}")).1
}

fn start(test: &str, size: u64) -> (tempfile::TempDir, Server, Vec<u8>) {
    let dir = scratch_dir(test);
    let img = dir.path().join("disk.img");
    let contents = image::create_random(&img, size, 31);
    let server = Serve::new(&img).start();
    (dir, server, contents)
}

/// Requests past the end and with unknown flags: the right errno, the connection stays usable,
/// nothing is written and the image does not grow.
#[test]
fn out_of_range_and_malformed_requests_get_errors() {
    let (_dir, server, contents) = start("bounds", SIZE);
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.connect_uri({uri:?})
h.set_strict_mode(0)
S = h.get_size()
attempt("read-past-end", lambda: h.pread(8192, S - 4096))
attempt("read-beyond-end", lambda: h.pread(512, S + 4096))
attempt("read-offset-overflow", lambda: h.pread(4096, 2**64 - 2048))
attempt("write-past-end", lambda: h.pwrite(b"\x99" * 8192, S - 4096))
attempt("write-offset-overflow", lambda: h.pwrite(b"\x99" * 4096, 2**64 - 2048))
attempt("trim-past-end", lambda: h.trim(8192, S - 4096))
attempt("zero-past-end", lambda: h.zero(8192, S - 4096))
attempt("cache-past-end", lambda: h.cache(8192, S - 4096))
attempt("status-past-end", lambda: h.block_status(8192, S + 4096, lambda *a: 0))
attempt("read-unknown-flag", lambda: h.pread(512, 0, 1 << 15))
attempt("write-unknown-flag", lambda: h.pwrite(b"\x99" * 512, 0, 1 << 15))
attempt("read-last-byte", lambda: h.pread(1, S - 1))
"#,
        uri = server.uri()
    );
    let (results, context) = outcomes(&script);
    let expect = |name: &str, allowed: &[Option<u32>]| {
        let got = outcome(&results, name, &context);
        assert!(
            allowed.contains(&got),
            "{name}: got {got:?} (None = success), expected one of {allowed:?}\n{context}"
        );
    };
    expect("read-past-end", &[Some(EINVAL)]);
    expect("read-beyond-end", &[Some(EINVAL)]);
    expect("read-offset-overflow", &[Some(EINVAL)]);
    expect("write-past-end", &[Some(ENOSPC)]);
    expect("write-offset-overflow", &[Some(ENOSPC), Some(EINVAL)]);
    expect("trim-past-end", &[Some(EINVAL)]);
    expect("zero-past-end", &[Some(ENOSPC), Some(EINVAL)]);
    expect("cache-past-end", &[Some(EINVAL)]);
    expect("status-past-end", &[Some(EINVAL)]);
    expect("read-unknown-flag", &[Some(EINVAL)]);
    expect("write-unknown-flag", &[Some(EINVAL)]);
    expect("read-last-byte", &[None]);

    let (results, context) = outcomes(&format!(
        "h.connect_uri({:?})\nattempt('fresh-read', lambda: h.pread(4096, 0))\n",
        server.uri()
    ));
    assert_eq!(
        outcome(&results, "fresh-read", &context),
        None,
        "server unusable after bad requests\n{context}"
    );
    let img = server.image().to_owned();
    server.stop();
    image::assert_same_bytes("image after refused requests", &image::read(&img), &contents);
}

/// The largest READ and WRITE, 64 MiB each in one request (libnbd sends that much without
/// splitting it; nbdkit accepts as much), on both engines, at an offset that is not a multiple
/// of 4096: the bytes come back, and the image holds them. libnbd refuses to send more than
/// 64 MiB, so the refusal of larger requests (EINVAL, stream in sync, image untouched) is
/// tested with the raw client of `bad_input.rs`.
#[test]
fn a_64_mib_write_and_read_in_one_request_each() {
    const LEN: u64 = 64 * MIB;
    const AT: u64 = 512;
    for engine in ["uring", "sync"] {
        let dir = scratch_dir(&format!("big-{engine}"));
        let img = dir.path().join("disk.img");
        let mut contents = image::create_random(&img, LEN + MIB, 32);
        let data = Rng::new(33).bytes(LEN as usize);
        let data_file = dir.path().join("data.bin");
        let back_file = dir.path().join("back.bin");
        std::fs::write(&data_file, &data).expect("writing the data file");
        let server = Serve::new(&img).engine(engine).start();
        let script = format!(
            r#"
h.connect_uri({uri:?})
data = open({data:?}, "rb").read()
assert len(data) == {LEN}
attempt("write-64m", lambda: h.pwrite(data, {AT}))
back = []
attempt("read-64m", lambda: back.append(h.pread({LEN}, {AT})))
if back:
    open({back_file:?}, "wb").write(back[0])
"#,
            uri = server.uri(),
            data = data_file.display().to_string(),
            back_file = back_file.display().to_string(),
        );
        let (results, context) = outcomes(&script);
        assert_eq!(outcome(&results, "write-64m", &context), None, "{engine}: 64 MiB WRITE\n{context}");
        assert_eq!(outcome(&results, "read-64m", &context), None, "{engine}: 64 MiB READ\n{context}");
        image::assert_same_bytes(&format!("{engine}: 64 MiB read back"), &image::read(&back_file), &data);
        server.stop();
        contents[AT as usize..(AT + LEN) as usize].copy_from_slice(&data);
        image::assert_same_bytes(
            &format!("{engine}: image after a 64 MiB write"),
            &image::read(&img),
            &contents,
        );
    }
}

/// `NBD_CMD_FLAG_FAST_ZERO`: either done (and reads back as zeroes) or refused with ENOTSUP,
/// never another error.
#[test]
fn fast_zero_succeeds_or_reports_enotsup() {
    let (_dir, server, mut contents) = start("fastzero", SIZE);
    let script = format!(
        r#"
h.connect_uri({uri:?})
attempt("fast-zero-aligned", lambda: h.zero(1048576, 4 * 1048576, nbd.CMD_FLAG_FAST_ZERO))
attempt("fast-zero-unaligned", lambda: h.zero(10000, 9 * 1048576 + 7, nbd.CMD_FLAG_FAST_ZERO))
attempt("fast-zero-no-hole", lambda: h.zero(65536, 12 * 1048576, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
"#,
        uri = server.uri()
    );
    let (results, context) = outcomes(&script);
    for (name, off, len) in [
        ("fast-zero-aligned", 4 * MIB, MIB),
        ("fast-zero-unaligned", 9 * MIB + 7, 10000),
        ("fast-zero-no-hole", 12 * MIB, 65536),
    ] {
        match outcome(&results, name, &context) {
            None => contents[off as usize..(off + len) as usize].fill(0),
            Some(ENOTSUP) => {}
            Some(other) => panic!("{name}: errno {other}; a fast zero may only fail with ENOTSUP\n{context}"),
        }
    }
    let img = server.image().to_owned();
    server.stop();
    image::assert_same_bytes("image after fast zeroes", &image::read(&img), &contents);
}

/// Without structured replies (as the Linux kernel client connects) reads, writes and errors
/// use simple replies.
#[test]
fn simple_replies_without_structured_negotiation() {
    let (_dir, server, mut contents) = start("simple", SIZE);
    let script = format!(
        r#"
h.set_request_structured_replies(False)
h.connect_uri({uri:?})
assert not h.get_structured_replies_negotiated()
h.pwrite(b"\x42" * 100000, 1000001)
assert h.pread(100000, 1000001) == b"\x42" * 100000
h.zero(8192, 2 * 1048576)
assert h.pread(8192, 2 * 1048576) == bytes(8192)
print("reads", "OK")
h.set_strict_mode(0)
attempt("read-past-end", lambda: h.pread(8192, h.get_size() - 4096))
attempt("read-after-error", lambda: h.pread(512, 0))
"#,
        uri = server.uri()
    );
    let (results, context) = outcomes(&script);
    assert_eq!(outcome(&results, "reads", &context), None);
    assert_eq!(outcome(&results, "read-past-end", &context), Some(EINVAL), "{context}");
    assert_eq!(outcome(&results, "read-after-error", &context), None, "{context}");
    contents[1_000_001..1_100_001].fill(0x42);
    contents[2 * MIB as usize..(2 * MIB + 8192) as usize].fill(0);
    let img = server.image().to_owned();
    server.stop();
    image::assert_same_bytes("image after simple-reply session", &image::read(&img), &contents);
}

/// NBD_OPT_LIST_META_CONTEXT answers queries (including the `base:` wildcard) and
/// NBD_OPT_SET_META_CONTEXT selects only the contexts that exist.
#[test]
fn meta_context_list_and_set() {
    let (_dir, server, _) = start("metactx", 16 * MIB);
    let script = format!(
        r#"
h.set_opt_mode(True)
h.connect_uri({uri:?})
def listed(queries):
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    return names
print("all", ",".join(sorted(listed([]))))
print("base", ",".join(sorted(listed(["base:"]))))
print("exact", ",".join(sorted(listed(["qemu:dirty-bitmap:live"]))))
print("unknown", ",".join(sorted(listed(["x-nosuch:thing", "qemu:dirty-bitmap:nosuch"]))))
h.clear_meta_contexts()
for q in ["base:allocation", "x-nosuch:thing", "qemu:dirty-bitmap:live", "qemu:dirty-bitmap:nosuch"]:
    h.add_meta_context(q)
h.opt_go()
for q in ["base:allocation", "x-nosuch:thing", "qemu:dirty-bitmap:live", "qemu:dirty-bitmap:nosuch"]:
    print("can", q, h.can_meta_context(q))
"#,
        uri = server.uri()
    );
    let out = run(nbdsh().arg("-c").arg(script));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |prefix: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", show_output(&out)))
            .to_owned()
    };
    let all = line("all ");
    for ctx in ["base:allocation", "qemu:dirty-bitmap:live"] {
        assert!(all.split(',').any(|c| c == ctx), "listing all contexts lacks {ctx}: {all}");
    }
    assert_eq!(line("base "), "base:allocation", "the base: wildcard");
    assert_eq!(line("exact "), "qemu:dirty-bitmap:live", "an exact query");
    assert_eq!(line("unknown "), "", "unknown contexts must not be listed");
    assert_eq!(line("can base:allocation "), "True");
    assert_eq!(line("can qemu:dirty-bitmap:live "), "True");
    assert_eq!(line("can x-nosuch:thing "), "False");
    assert_eq!(line("can qemu:dirty-bitmap:nosuch "), "False");
    server.stop();
}

/// With `--direct` the server advertises a minimum block size; requests that ignore it are
/// refused with EINVAL (or served correctly), never corrupting data.
#[test]
fn direct_io_unaligned_requests_are_refused_or_correct() {
    let dir = scratch_dir("direct-unaligned");
    let img = dir.path().join("disk.img");
    let mut contents = image::create_random(&img, 16 * MIB, 41);
    let server = Serve::new(&img).direct().start();
    let script = format!(
        r#"
h.connect_uri({uri:?})
h.set_strict_mode(0)
attempt("unaligned-write", lambda: h.pwrite(b"\x61" * 1000, 4096 * 3 + 100))
attempt("unaligned-read", lambda: h.pread(1000, 4096 * 5 + 100))
attempt("aligned-write", lambda: h.pwrite(b"\x62" * 8192, 4096 * 8))
"#,
        uri = server.uri()
    );
    let (results, context) = outcomes(&script);
    match outcome(&results, "unaligned-write", &context) {
        None => contents[4096 * 3 + 100..4096 * 3 + 1100].fill(0x61),
        Some(EINVAL) => {}
        Some(other) => {
            panic!("unaligned write with --direct: errno {other}, expected success or EINVAL\n{context}")
        }
    }
    assert!(
        matches!(outcome(&results, "unaligned-read", &context), None | Some(EINVAL)),
        "unaligned read with --direct\n{context}"
    );
    assert_eq!(outcome(&results, "aligned-write", &context), None, "{context}");
    contents[4096 * 8..4096 * 10].fill(0x62);
    server.stop();
    image::assert_same_bytes("image after --direct requests", &image::read(&img), &contents);
}

//! The server and its engines driven end to end by `nbd_proto`'s client over a Unix socket.

use std::path::Path;
use std::sync::Arc;

use nbd_proto::client::{Client, ClientError};
use nbd_proto::consts::REP_ERR_UNKNOWN;

use crate::export::{Export, StaticCatalog};
use crate::{Backend, EngineKind, Listener, Server};

/// Our server on `img` as export "disk", on a Unix socket beside it, run on a thread.
fn serve(img: &Path, engine: EngineKind) -> (Arc<Server>, std::thread::JoinHandle<()>, std::path::PathBuf) {
    serve_polling(img, engine, std::time::Duration::ZERO)
}

/// [`serve`], with connections polling their socket for up to `idle_poll`.
fn serve_polling(
    img: &Path,
    engine: EngineKind,
    idle_poll: std::time::Duration,
) -> (Arc<Server>, std::thread::JoinHandle<()>, std::path::PathBuf) {
    let backend = Arc::new(Backend::open(img, false, false).unwrap());
    let export = Arc::new(Export::live("disk", backend, false, None));
    let sock = img.with_extension("sock");
    let listener = Listener::unix(&sock).unwrap();
    let mut server = Server::new(Arc::new(StaticCatalog(vec![export])), vec![listener], engine).unwrap();
    server.set_idle_poll(idle_poll);
    let server = Arc::new(server);
    let s = server.clone();
    (server, std::thread::spawn(move || s.run().unwrap()), sock)
}

#[test]
fn reads_and_maps_through_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![7u8; 1 << 20], 2 << 20).unwrap();
    let (server, t, sock) = serve(&img, EngineKind::detect());
    let mut c = Client::connect_unix(&sock, "disk", &["base:allocation"]).unwrap();
    assert_eq!(c.size(), 8 << 20);
    let mut buf = vec![1u8; 3 << 20];
    c.read(1 << 20, &mut buf).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 0), "hole reads as zeroes");
    assert!(buf[1 << 20..2 << 20].iter().all(|&b| b == 7));
    let map = c.map("base:allocation").unwrap();
    assert_eq!(map, vec![(0, 2 << 20, 3), (2 << 20, 1 << 20, 0), (3 << 20, 5 << 20, 3)]);
    assert!(matches!(c.read(8 << 20, &mut [0u8; 1]), Err(ClientError::Errno(22))));
    assert!(matches!(
        Client::connect_unix(&sock, "nope", &[]),
        Err(ClientError::Refused { reply: REP_ERR_UNKNOWN, .. })
    ));
    c.disconnect().unwrap();
    server.shutdown_handle().trigger();
    t.join().unwrap();
}

/// The io_uring engine's queue-depth-1 reads go linked to their reply's send; when such a
/// read comes up short or finds nothing (the file shrank under the export), the send is
/// cancelled and the read ends the ordinary way: EIO, and the connection goes on.
#[test]
fn linked_reads_and_their_failures_on_the_uring_engine() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let f = std::fs::File::create(&img).unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
    let (server, t, sock) = serve(&img, EngineKind::Uring);
    let mut c = Client::connect_unix(&sock, "disk", &[]).unwrap();
    for (offset, len) in [(0u64, 4096usize), (12345, 1000), ((8 << 20) - 4096, 4096), (4 << 20, 60 << 10)] {
        let mut buf = vec![0u8; len];
        c.read(offset, &mut buf).unwrap();
        assert_eq!(buf, data[offset as usize..offset as usize + len], "read {len} at {offset}");
    }
    // The file ends 1000 bytes into this block: a short read, then nothing.
    f.set_len((4 << 20) + 1000).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(c.read(4 << 20, &mut buf), Err(ClientError::Errno(5))));
    assert!(matches!(c.read(6 << 20, &mut buf), Err(ClientError::Errno(5))));
    c.read(4096, &mut buf).unwrap();
    assert_eq!(buf, data[4096..8192]);
    c.disconnect().unwrap();
    server.shutdown_handle().trigger();
    t.join().unwrap();
}

/// A client at queue depth 1 on a polling server: the connection turns hot, so its small
/// reads and writes run on the connection's thread and their replies go straight out;
/// large ones still go through the engine. Data, errors (a read past the end of a file
/// that shrank) and a shutdown while the client sits idle behave as on any connection.
#[test]
fn a_hot_connection_serves_requests_synchronously() {
    let _one_at_a_time = crate::engine::poll::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for engine in [EngineKind::Uring, EngineKind::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(8 << 20).unwrap();
        let (server, t, sock) = serve_polling(&img, engine, std::time::Duration::from_millis(20));
        let mut c = Client::connect_unix(&sock, "disk", &[]).unwrap();
        let mut model = vec![0u8; 8 << 20];
        for i in 0..300u64 {
            let len = [512usize, 4096, 64 << 10, 1 << 20][(i % 4) as usize];
            let offset = (i * 7919 * 512) % ((8 << 20) - (1 << 20));
            let data: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j) as u8).collect();
            c.write(offset, &data).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            c.read(offset, &mut back).unwrap();
            assert_eq!(back, data, "{engine:?}: write {i} read back");
        }
        c.flush().unwrap();
        let mut all = vec![0u8; 8 << 20];
        c.read(0, &mut all[..4 << 20]).unwrap();
        c.read(4 << 20, &mut all[4 << 20..]).unwrap();
        assert!(all == model, "{engine:?}: the image as written");
        assert_eq!(std::fs::read(&img).unwrap(), model, "{engine:?}: the file as written");
        f.set_len((4 << 20) + 1000).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(matches!(c.read(4 << 20, &mut buf), Err(ClientError::Errno(5))), "{engine:?}");
        assert!(matches!(c.read(6 << 20, &mut buf), Err(ClientError::Errno(5))), "{engine:?}");
        c.read(4096, &mut buf).unwrap();
        assert_eq!(buf, model[4096..8192]);
        // The client goes quiet and stays connected: the server still stops.
        server.shutdown_handle().trigger();
        t.join().unwrap();
        drop(c);
    }
}

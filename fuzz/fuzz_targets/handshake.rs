//! Arbitrary client bytes against the fixed-newstyle handshake, chunked as a driver would by
//! `wants()`, until the negotiation ends or the bytes run out. It must never panic, never ask
//! for more than `MAX_OPTION_LEN` bytes at once, and frame every reply correctly; a negotiated
//! session must name a real export with the flags it advertises. Bytes left after a successful
//! negotiation are requests of that session (see `siterep_fuzz::check_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::consts::*;
use nbd_proto::handshake::{Handshake, Negotiated, Outcome};
use nbd_proto::transmission::Session;
use nbd_proto::{ExportInfo, MAX_OPTION_LEN};
use siterep_fuzz::{check_header, exports};

/// Splits `out` into option replies and checks their framing.
fn check_option_replies(mut out: &[u8]) -> Vec<(u32, u32)> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply: {out:02x?}");
        assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), REPLY_MAGIC_OPT, "option reply magic");
        let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(len <= MAX_OPTION_LEN as usize, "option reply of {len} bytes");
        assert!(out.len() >= 20 + len, "option reply length {len} runs past the output");
        if kind == REP_ACK {
            assert_eq!(len, 0, "ACK with data");
        }
        replies.push((option, kind));
        out = &out[20 + len..];
    }
    replies
}

fn check_negotiated(exports: &[ExportInfo], n: &Negotiated, out: &[u8]) {
    let e = exports.get(n.export).expect("negotiated export index out of range");
    assert_eq!(n.flags, e.transmission_flags(n.structured), "advertised flags");
    let mut last_id = 0;
    for &(id, idx) in &n.contexts {
        assert!(n.structured, "meta contexts without structured replies");
        assert!(id > last_id, "context ids not unique and increasing: {:?}", n.contexts);
        assert!(idx < e.contexts.len(), "context index out of range: {:?}", n.contexts);
        last_id = id;
    }
    let is_export_name_reply = (out.len() == 10 || out.len() == 134)
        && (out.len() < 8 || u64::from_be_bytes(out[..8].try_into().unwrap()) != REPLY_MAGIC_OPT);
    if is_export_name_reply {
        assert_eq!(u64::from_be_bytes(out[..8].try_into().unwrap()), e.size, "EXPORT_NAME size");
        assert_eq!(u16::from_be_bytes([out[8], out[9]]), n.flags, "EXPORT_NAME flags");
        assert!(out[10..].iter().all(|&b| b == 0), "EXPORT_NAME padding");
    } else {
        let replies = check_option_replies(out);
        assert_eq!(replies.last(), Some(&(OPT_GO, REP_ACK)), "transmission without GO's ACK: {replies:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = exports();
    let mut hs = Handshake::new(exports.clone());
    let greeting = hs.take_output();
    assert_eq!(greeting.len(), 18, "greeting");
    let mut input = data;
    loop {
        let want = hs.wants();
        assert!(want > 0, "the handshake continues but wants no bytes");
        assert!(want <= MAX_OPTION_LEN as usize, "the handshake wants {want} bytes at once");
        if input.len() < want {
            return; // the client went away
        }
        let outcome = hs.input(&input[..want]);
        input = &input[want..];
        let out = hs.take_output();
        match outcome {
            Outcome::Continue => {
                check_option_replies(&out);
            }
            Outcome::Close(_) => {
                check_option_replies(&out);
                return;
            }
            Outcome::Transmit(n) => {
                check_negotiated(&exports, &n, &out);
                let session = Session::new(&exports[n.export], n.structured, !n.contexts.is_empty());
                // As the engines do: a header, then the WRITE payload (accepted or not) is
                // skipped; a bad magic ends the session.
                while input.len() >= REQUEST_LEN {
                    let Some(raw) = check_header(&session, input[..REQUEST_LEN].try_into().unwrap()) else {
                        return;
                    };
                    input = &input[REQUEST_LEN..];
                    input = &input[input.len().min(raw.payload_len() as usize)..];
                }
                return;
            }
        }
    }
});

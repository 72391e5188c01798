//! Fixed-newstyle negotiation ("Handshake" and "Option haggling" in `doc/proto.md`) as a
//! sans-IO state machine.
//!
//! The driver sends [`Handshake::take_output`], reads exactly [`Handshake::wants`] bytes and
//! passes them to [`Handshake::input`], until the state machine reports [`Outcome::Transmit`]
//! (enter the transmission phase) or [`Outcome::Close`] (end the session). No length from the
//! peer reaches an allocator unchecked: option payloads above [`MAX_OPTION_LEN`] are discarded in
//! bounded steps and answered with an error.

use crate::consts::*;
use crate::{ExportInfo, MetaContext, MAX_CONTEXTS, MAX_OPTION_LEN, MAX_STRING_LEN};

/// What the session agreed on, for the transmission phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in the list the handshake was given.
    pub export: usize,
    pub structured: bool,
    /// Selected contexts as (id, index into the export's `contexts`), in id order.
    pub contexts: Vec<(u32, usize)>,
    pub flags: u16,
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the output, then read `wants()` bytes.
    Continue,
    /// Send the output, then enter the transmission phase.
    Transmit(Negotiated),
    /// Send the output, then close the connection.
    Close(CloseReason),
}

/// Why a handshake ended without a transmission phase.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// The client's flags contain bits we do not know (spec: MUST close).
    UnknownClientFlags,
    /// An option header lacked the `IHAVEOPT` magic.
    BadMagic,
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have (spec: MUST terminate).
    UnknownExport,
    /// A non-fixed-newstyle client sent an option other than `NBD_OPT_EXPORT_NAME`.
    NotFixedNewstyle,
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: u32 },
    Discard { option: u32, remaining: u32 },
    Done,
}

/// The server side of the negotiation for one connection.
#[derive(Debug)]
pub struct Handshake {
    exports: Vec<ExportInfo>,
    state: State,
    out: Vec<u8>,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// The export name the last `NBD_OPT_SET_META_CONTEXT` referred to, and what it selected.
    meta: Option<(String, Vec<(u32, usize)>)>,
}

impl Handshake {
    /// Starts a handshake offering `exports`; the first one is the default (empty name).
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        let mut out = Vec::with_capacity(18);
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Self {
            exports,
            state: State::ClientFlags,
            out,
            fixed: false,
            no_zeroes: false,
            structured: false,
            meta: None,
        }
    }

    /// Bytes to send before reading again.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// How many bytes the next `input` call expects.
    pub fn wants(&self) -> usize {
        match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => 16,
            State::OptionData { len, .. } => len as usize,
            State::Done => 0,
            State::Discard { remaining, .. } => remaining.min(MAX_OPTION_LEN) as usize,
        }
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Feeds exactly `wants()` bytes.
    pub fn input(&mut self, data: &[u8]) -> Outcome {
        match std::mem::replace(&mut self.state, State::Done) {
            State::ClientFlags => {
                let flags = u32::from_be_bytes(data[..4].try_into().unwrap());
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Outcome::Close(CloseReason::UnknownClientFlags);
                }
                self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::OptionHeader;
                Outcome::Continue
            }
            State::OptionHeader => {
                let magic = u64::from_be_bytes(data[..8].try_into().unwrap());
                let option = u32::from_be_bytes(data[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(data[12..16].try_into().unwrap());
                if magic != IHAVEOPT {
                    return Outcome::Close(CloseReason::BadMagic);
                }
                if !self.fixed && option != OPT_EXPORT_NAME {
                    return Outcome::Close(CloseReason::NotFixedNewstyle);
                }
                if len > MAX_OPTION_LEN {
                    self.state = State::Discard { option, remaining: len };
                } else {
                    self.state = State::OptionData { option, len };
                    if len == 0 {
                        return self.option(option, &[]);
                    }
                }
                Outcome::Continue
            }
            State::OptionData { option, .. } => self.option(option, data),
            State::Discard { option, remaining } => {
                let fed = u32::try_from(data.len())
                    .ok()
                    .filter(|&n| n <= remaining)
                    .expect("input is fed exactly wants() bytes");
                let remaining = remaining - fed;
                if remaining > 0 {
                    self.state = State::Discard { option, remaining };
                } else {
                    self.state = State::OptionHeader;
                    if option == OPT_EXPORT_NAME {
                        // An export name longer than the spec allows names no export we have.
                        return Outcome::Close(CloseReason::UnknownExport);
                    }
                    self.reply_err(option, REP_ERR_TOO_BIG, "option too large");
                }
                Outcome::Continue
            }
            State::Done => panic!("handshake input after it finished"),
        }
    }

    fn reply(&mut self, option: u32, rtype: u32, data: &[u8]) {
        self.out.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
        self.out.extend_from_slice(&option.to_be_bytes());
        self.out.extend_from_slice(&rtype.to_be_bytes());
        self.out.extend_from_slice(&short_len(data.len()).to_be_bytes());
        self.out.extend_from_slice(data);
    }

    fn reply_err(&mut self, option: u32, rtype: u32, msg: &str) {
        self.reply(option, rtype, msg.as_bytes());
    }

    /// Handles one complete option; the state has been set to `Done` by `input`.
    fn option(&mut self, option: u32, data: &[u8]) -> Outcome {
        self.state = State::OptionHeader;
        match option {
            OPT_EXPORT_NAME => {
                let Some(idx) = std::str::from_utf8(data).ok().and_then(|n| self.find_export(n)) else {
                    return Outcome::Close(CloseReason::UnknownExport);
                };
                let e = &self.exports[idx];
                let flags = e.transmission_flags(self.structured);
                self.out.extend_from_slice(&e.size.to_be_bytes());
                self.out.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                let name = e.name.clone();
                self.finish(idx, &name, flags)
            }
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                self.state = State::Done;
                Outcome::Close(CloseReason::Aborted)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_err(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Outcome::Continue;
                }
                for i in 0..self.exports.len() {
                    let name = self.exports[i].name.clone();
                    let desc = self.exports[i].description.clone();
                    let mut d = Vec::with_capacity(4 + name.len() + desc.len());
                    d.extend_from_slice(&short_len(name.len()).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(desc.as_bytes());
                    self.reply(option, REP_SERVER, &d);
                }
                self.reply(option, REP_ACK, &[]);
                Outcome::Continue
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    self.reply_err(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else {
                    self.reply_err(option, REP_ERR_UNSUP, "TLS is not supported by this NBD server");
                }
                Outcome::Continue
            }
            OPT_INFO | OPT_GO => self.info_go(option, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_err(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
                Outcome::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data);
                Outcome::Continue
            }
            _ => {
                self.reply_err(option, REP_ERR_UNSUP, "unknown option");
                Outcome::Continue
            }
        }
    }

    fn finish(&mut self, export: usize, name: &str, flags: u16) -> Outcome {
        self.state = State::Done;
        let contexts = match &self.meta {
            Some((n, sel)) if self.structured && (n == name || (n.is_empty() && export == 0)) => sel.clone(),
            _ => Vec::new(),
        };
        Outcome::Transmit(Negotiated { export, structured: self.structured, contexts, flags })
    }

    fn info_go(&mut self, option: u32, data: &[u8]) -> Outcome {
        let Some((name, requests)) = parse_info(data) else {
            self.reply_err(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
            return Outcome::Continue;
        };
        let Some(idx) = self.find_export(name) else {
            self.reply_err(option, REP_ERR_UNKNOWN, "no such export");
            return Outcome::Continue;
        };
        let e = self.exports[idx].clone();
        let flags = e.transmission_flags(self.structured);
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &d);
        // Block sizes are always sent: we enforce them whether or not the client asked.
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&e.block_sizes.minimum.to_be_bytes());
        d.extend_from_slice(&e.block_sizes.preferred.to_be_bytes());
        d.extend_from_slice(&e.block_sizes.maximum.to_be_bytes());
        self.reply(option, REP_INFO, &d);
        if requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        if requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            let name = e.name.clone();
            self.finish(idx, &name, flags)
        } else {
            Outcome::Continue
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // Spec: SET replaces the previous selection even when it fails.
            self.meta = None;
        }
        if set && !self.structured {
            self.reply_err(option, REP_ERR_INVALID, "negotiate structured replies first");
            return;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            self.reply_err(option, REP_ERR_INVALID, "malformed metadata context request");
            return;
        };
        if queries.iter().any(|q| !q.contains(':')) {
            self.reply_err(option, REP_ERR_INVALID, "a metadata context query needs a namespace");
            return;
        }
        let Some(idx) = self.find_export(name) else {
            self.reply_err(option, REP_ERR_UNKNOWN, "no such export");
            return;
        };
        let names: Vec<String> = self.exports[idx].contexts.iter().map(MetaContext::name).collect();
        let mut selected: Vec<usize> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let matches = if queries.is_empty() {
                !set
            } else {
                // LIST also takes a namespace (or namespace prefix ending in ':') as a wildcard.
                queries.iter().any(|q| *q == n.as_str() || (!set && q.ends_with(':') && n.starts_with(q)))
            };
            if matches {
                selected.push(i);
            }
        }
        let mut chosen = Vec::with_capacity(selected.len());
        for (id, i) in (1u32..).zip(selected) {
            let id = if set { id } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(names[i].as_bytes());
            self.reply(option, REP_META_CONTEXT, &d);
            chosen.push((id, i));
        }
        self.reply(option, REP_ACK, &[]);
        if set {
            let canonical = if name.is_empty() { String::new() } else { self.exports[idx].name.clone() };
            self.meta = Some((canonical, chosen));
        }
    }
}

/// The length field of a reply this side built: from an export's name, description or context
/// names (strings the server was configured with) or a fixed message, so far below 4 GiB.
fn short_len(len: usize) -> u32 {
    u32::try_from(len).expect("option replies are built from short strings")
}

/// Reads a u32-length-prefixed string at `*pos`.
fn take_string<'a>(data: &'a [u8], pos: &mut usize) -> Option<&'a str> {
    let len = u32::from_be_bytes(data.get(*pos..*pos + 4)?.try_into().ok()?) as usize;
    if len > MAX_STRING_LEN {
        return None;
    }
    let s = data.get(*pos + 4..*pos + 4 + len)?;
    *pos += 4 + len;
    std::str::from_utf8(s).ok()
}

/// `NBD_OPT_INFO`/`GO` data: name, then a u16 count of u16 info requests; nothing after.
fn parse_info(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut pos = 0;
    let name = take_string(data, &mut pos)?;
    let n = u16::from_be_bytes(data.get(pos..pos + 2)?.try_into().ok()?) as usize;
    pos += 2;
    if data.len() != pos + 2 * n {
        return None;
    }
    let reqs = data[pos..].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some((name, reqs))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name, u32 count, that many strings.
fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut pos = 0;
    let name = take_string(data, &mut pos)?;
    let n = u32::from_be_bytes(data.get(pos..pos + 4)?.try_into().ok()?) as usize;
    pos += 4;
    if n > MAX_CONTEXTS * 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(take_string(data, &mut pos)?);
    }
    (pos == data.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{option, BlockSizes, MAX_PAYLOAD};

    fn export(name: &str) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: "test disk".into(),
            size: 1 << 20,
            read_only: false,
            rotational: false,
            block_sizes: BlockSizes { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD },
            contexts: vec![MetaContext::Allocation, MetaContext::DirtyBitmap("live".into())],
        }
    }

    /// Drives a handshake with a scripted client; returns the server's bytes and the outcome.
    struct Client {
        hs: Handshake,
        got: Vec<u8>,
    }

    impl Client {
        fn new(flags: u32) -> (Self, Outcome) {
            let mut hs = Handshake::new(vec![export("disk"), export("other")]);
            let got = hs.take_output();
            assert_eq!(got.len(), 18);
            let mut c = Self { hs, got: Vec::new() };
            let o = c.feed(&flags.to_be_bytes());
            (c, o)
        }
        fn feed(&mut self, mut bytes: &[u8]) -> Outcome {
            loop {
                let want = self.hs.wants();
                let o = self.hs.input(&bytes[..want]);
                bytes = &bytes[want..];
                self.got.extend(self.hs.take_output());
                if o != Outcome::Continue || bytes.is_empty() {
                    return o;
                }
            }
        }
        fn option(&mut self, opt: u32, data: &[u8]) -> Outcome {
            self.feed(&option::frame(opt, data).unwrap())
        }
        /// Parses the option replies received so far: (option, type, data).
        fn replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
            let mut out = Vec::new();
            let mut b = &self.got[..];
            while b.len() >= 20 {
                assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), REPLY_MAGIC_OPT);
                let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
                let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
                let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
                out.push((opt, t, b[20..20 + l].to_vec()));
                b = &b[20 + l..];
            }
            assert!(b.is_empty());
            self.got.clear();
            out
        }
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        option::info_data(name, reqs).unwrap()
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        option::meta_context_data(name, queries).unwrap()
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let mut hs = Handshake::new(vec![export("disk")]);
        let g = hs.take_output();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn unknown_client_flags_close() {
        let (_, o) = Client::new(0x8000_0001);
        assert_eq!(o, Outcome::Close(CloseReason::UnknownClientFlags));
    }

    #[test]
    fn bad_option_magic_closes() {
        let (mut c, _) = Client::new(3);
        let mut b = 0x1234u64.to_be_bytes().to_vec();
        b.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
        assert_eq!(c.feed(&b), Outcome::Close(CloseReason::BadMagic));
    }

    #[test]
    fn unknown_option_is_unsup_and_haggling_continues() {
        let (mut c, _) = Client::new(3);
        assert_eq!(c.option(99, b"junk"), Outcome::Continue);
        assert_eq!(c.replies(), vec![(99, REP_ERR_UNSUP, b"unknown option".to_vec())]);
        assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]), Outcome::Continue);
        assert_eq!(c.replies(), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
    }

    #[test]
    fn malformed_options_are_invalid() {
        let (mut c, _) = Client::new(3);
        let mut bad = info_data("disk", &[1, 2]);
        bad.pop(); // the request count no longer matches the length
        for (opt, data) in [
            (OPT_GO, bad.clone()),
            (OPT_INFO, vec![0, 0, 0, 9, b'x']),
            (OPT_LIST, vec![1]),
            (OPT_STRUCTURED_REPLY, vec![1]),
            (OPT_STARTTLS, vec![1]),
        ] {
            assert_eq!(c.option(opt, &data), Outcome::Continue);
            let r = c.replies();
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_INVALID), "option {opt}");
        }
    }

    #[test]
    fn starttls_is_refused_as_unsupported() {
        let (mut c, _) = Client::new(3);
        c.option(OPT_STARTTLS, &[]);
        assert_eq!(c.replies()[0].1, REP_ERR_UNSUP);
    }

    #[test]
    fn oversize_option_is_discarded_and_refused() {
        let (mut c, _) = Client::new(3);
        let big = vec![0u8; MAX_OPTION_LEN as usize + 10];
        assert_eq!(c.option(OPT_GO, &big), Outcome::Continue);
        assert_eq!(c.replies()[0].1, REP_ERR_TOO_BIG);
        assert_eq!(c.option(OPT_ABORT, &[]), Outcome::Close(CloseReason::Aborted));
    }

    #[test]
    fn list_names_every_export() {
        let (mut c, _) = Client::new(3);
        c.option(OPT_LIST, &[]);
        let r = c.replies();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..8], b"disk");
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn go_unknown_export_then_default_succeeds() {
        let (mut c, _) = Client::new(3);
        assert_eq!(c.option(OPT_GO, &info_data("nope", &[])), Outcome::Continue);
        assert_eq!(c.replies()[0].1, REP_ERR_UNKNOWN);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        c.replies();
        let o = c.option(OPT_GO, &info_data("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]));
        let Outcome::Transmit(n) = o else { panic!("{o:?}") };
        assert_eq!(n.export, 0);
        assert!(n.structured);
        assert!(n.flags & FLAG_SEND_DF != 0);
        let r = c.replies();
        let types: Vec<u16> =
            r.iter().filter(|x| x.1 == REP_INFO).map(|x| u16::from_be_bytes([x.2[0], x.2[1]])).collect();
        assert_eq!(types, vec![INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]);
        let bs = &r[1].2;
        assert_eq!(u32::from_be_bytes(bs[10..14].try_into().unwrap()), MAX_PAYLOAD);
        assert_eq!(r.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
        for (flags, tail) in [(1u32, 124usize), (3, 0)] {
            let (mut c, _) = Client::new(flags);
            let o = c.option(OPT_EXPORT_NAME, b"other");
            let Outcome::Transmit(n) = o else { panic!("{o:?}") };
            assert_eq!(n.export, 1);
            assert_eq!(c.got.len(), 10 + tail);
            assert_eq!(u64::from_be_bytes(c.got[..8].try_into().unwrap()), 1 << 20);
        }
        let (mut c, _) = Client::new(3);
        assert_eq!(c.option(OPT_EXPORT_NAME, b"zzz"), Outcome::Close(CloseReason::UnknownExport));
    }

    #[test]
    fn meta_contexts_list_set_and_selection_follow_export() {
        let (mut c, _) = Client::new(3);
        c.option(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]));
        assert_eq!(c.replies()[0].1, REP_ERR_INVALID, "SET before structured replies");
        c.option(OPT_STRUCTURED_REPLY, &[]);
        c.replies();
        c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
        let r = c.replies();
        assert_eq!(r.len(), 3);
        c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &["qemu:dirty-bitmap:"]));
        assert_eq!(c.replies().len(), 2);
        assert_eq!(&r[1].2[4..], b"qemu:dirty-bitmap:live");
        c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &["qemu:", "x-unknown:foo"]));
        assert_eq!(c.replies().len(), 2);
        c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &["nocolon"]));
        assert_eq!(c.replies()[0].1, REP_ERR_INVALID);
        c.option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["qemu:dirty-bitmap:live", "base:allocation", "foo:bar"]),
        );
        let r = c.replies();
        assert_eq!(r.len(), 3);
        let ids: Vec<u32> = r[..2].iter().map(|x| u32::from_be_bytes(x.2[..4].try_into().unwrap())).collect();
        assert_eq!(ids, vec![1, 2]);
        // GO to the export the contexts were set for: they carry over.
        let o = c.option(OPT_GO, &info_data("disk", &[]));
        let Outcome::Transmit(n) = o else { panic!() };
        assert_eq!(n.contexts, vec![(1, 0), (2, 1)]);
    }

    #[test]
    fn contexts_set_for_another_export_are_dropped() {
        let (mut c, _) = Client::new(3);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        c.option(OPT_SET_META_CONTEXT, &meta_data("other", &["base:allocation"]));
        let Outcome::Transmit(n) = c.option(OPT_GO, &info_data("disk", &[])) else { panic!() };
        assert!(n.contexts.is_empty());
    }

    #[test]
    fn non_fixed_client_may_only_use_export_name() {
        let (mut c, _) = Client::new(0);
        assert_eq!(c.option(OPT_LIST, &[]), Outcome::Close(CloseReason::NotFixedNewstyle));
    }

    #[test]
    fn read_only_export_flags() {
        let mut e = export("ro");
        e.read_only = true;
        let f = e.transmission_flags(false);
        assert!(f & FLAG_READ_ONLY != 0 && f & FLAG_SEND_TRIM == 0 && f & FLAG_SEND_DF == 0);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut hs = Handshake::new(vec![export("disk")]);
            hs.take_output();
            let mut b = &data[..];
            loop {
                let want = hs.wants();
                if b.len() < want { break; }
                let o = hs.input(&b[..want]);
                b = &b[want..];
                if o != Outcome::Continue { break; }
            }
        }
    }
}

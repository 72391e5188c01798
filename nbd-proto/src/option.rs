//! Option requests as a client sends them ("Option haggling" in `doc/proto.md`): the frame every
//! option travels in, and the data of the options that carry more than a string.
//!
//! [`frame`] sends its data as given, so a test can frame deliberately malformed data (a length
//! field that lies, a cut query, trailing bytes) with the same encoder a well-behaved client uses.

use crate::consts::IHAVEOPT;

/// A length that does not fit the field the protocol gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} of {len} does not fit its length field")]
pub struct TooLong {
    pub what: &'static str,
    pub len: usize,
}

fn len_u32(what: &'static str, len: usize) -> Result<u32, TooLong> {
    u32::try_from(len).map_err(|_| TooLong { what, len })
}

fn len_u16(what: &'static str, len: usize) -> Result<u16, TooLong> {
    u16::try_from(len).map_err(|_| TooLong { what, len })
}

/// One option request: `IHAVEOPT`, the option, the length of `data`, then `data`.
pub fn frame(option: u32, data: &[u8]) -> Result<Vec<u8>, TooLong> {
    let len = len_u32("option data", data.len())?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    Ok(b)
}

/// Appends a string with its 32-bit length before it.
fn put_string(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), TooLong> {
    out.extend_from_slice(&len_u32(what, s.len())?.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: the export name, then the number of information
/// requests and the requests (`NBD_INFO_*`).
pub fn info_data(export: &str, infos: &[u16]) -> Result<Vec<u8>, TooLong> {
    let mut d = Vec::with_capacity(4 + export.len() + 2 + 2 * infos.len());
    put_string(&mut d, "export name", export)?;
    d.extend_from_slice(&len_u16("information request count", infos.len())?.to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    Ok(d)
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the export name, then
/// the number of queries and the queries, each a string.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Result<Vec<u8>, TooLong> {
    let mut d = Vec::with_capacity(4 + export.len() + 4 + queries.iter().map(|q| 4 + q.len()).sum::<usize>());
    put_string(&mut d, "export name", export)?;
    d.extend_from_slice(&len_u32("query count", queries.len())?.to_be_bytes());
    for q in queries {
        put_string(&mut d, "query", q)?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::*;

    #[test]
    fn frames_and_data_as_the_spec_lays_them_out() {
        let f = frame(OPT_GO, b"abc").unwrap();
        assert_eq!(&f[..8], b"IHAVEOPT");
        assert_eq!(f[8..12], OPT_GO.to_be_bytes());
        assert_eq!(f[12..16], 3u32.to_be_bytes());
        assert_eq!(&f[16..], b"abc");
        assert_eq!(frame(OPT_ABORT, &[]).unwrap().len(), 16);

        let d = info_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE]).unwrap();
        assert_eq!(d, [&[0, 0, 0, 4][..], b"disk", &[0, 2, 0, 1, 0, 3]].concat());

        let d = meta_context_data("", &["base:allocation", "x:"]).unwrap();
        let want = [&[0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 15][..], b"base:allocation", &[0, 0, 0, 2], b"x:"];
        assert_eq!(d, want.concat());
    }

    #[test]
    fn counts_that_do_not_fit_are_refused() {
        let infos = vec![0u16; 1 << 16];
        assert_eq!(info_data("", &infos), Err(TooLong { what: "information request count", len: 1 << 16 }));
    }
}

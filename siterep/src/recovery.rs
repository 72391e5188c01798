//! Recovery-site commands on a store: `siterep points`, `siterep restore`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use server::{PointSel, Store};

/// A point: its id, or `latest`.
pub fn parse_point(s: &str) -> Result<PointSel, String> {
    if s == "latest" {
        return Ok(PointSel::Latest);
    }
    s.parse().map(PointSel::Id).map_err(|_| format!("invalid point {s:?}: a number or \"latest\""))
}

#[derive(Args, Debug)]
pub struct PointsArgs {
    #[command(subcommand)]
    action: Option<PointsAction>,
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR", global = true)]
    store: Option<PathBuf>,
    /// The disk.
    #[arg(long, global = true)]
    disk: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum PointsAction {
    /// List the disk's recovery points (the default).
    List,
    /// Tag a point (e.g. `tested` after a test failover passed); tagged points are kept.
    Tag {
        #[arg(long)]
        point: u64,
        tag: String,
    },
}

fn open_store(store: &Option<PathBuf>) -> Result<Store> {
    let dir = store.as_ref().context("--store DIR is required")?;
    Store::open_reader(dir).with_context(|| format!("opening store {}", dir.display()))
}

pub fn points(args: PointsArgs) -> Result<()> {
    let store = open_store(&args.store)?;
    let disk = args.disk.as_deref().context("--disk NAME is required")?;
    match args.action.unwrap_or(PointsAction::List) {
        PointsAction::List => {
            let points = store.points(disk)?;
            // When nothing was written since the latest point, the disk still equalled it at
            // this later time (docs/wire.md §6.9).
            let current = store.current_unix_ms(disk)?;
            if args.json {
                let mut list = serde_json::to_value(&points)?;
                if let (Some(last), Some(at)) = (list.as_array_mut().and_then(|l| l.last_mut()), current) {
                    last["current_unix_ms"] = at.into();
                }
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:>6} {:>10} {:>14} {:>13} {:>14}  tags",
                "point", "generation", "cut (unix ms)", "consistency", "changed bytes"
            );
            for p in &points {
                let tags: Vec<String> = p.tags.iter().map(|(t, at)| format!("{t}@{at}")).collect();
                println!(
                    "{:>6} {:>10} {:>14} {:>13} {:>14}  {}",
                    p.id,
                    p.generation,
                    p.cut_unix_ms,
                    format!("{:?}", p.consistency).to_lowercase(),
                    p.changed_bytes,
                    tags.join(",")
                );
            }
            if let (Some(last), Some(at)) = (points.last(), current) {
                if at > last.cut_unix_ms {
                    println!(
                        "point {} still equals the disk as of {at} (unix ms): nothing was written since",
                        last.id
                    );
                }
            }
        }
        PointsAction::Tag { point, tag } => {
            store.tag(disk, point, &tag)?;
            println!("point {point} of {disk} tagged {tag}");
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    #[arg(long)]
    disk: String,
    /// The point to restore: its id or `latest`.
    #[arg(long, value_parser = parse_point)]
    point: PointSel,
    /// The image to write (sparse; replaced if it exists).
    #[arg(long, visible_alias = "out", value_name = "FILE")]
    output: PathBuf,
}

pub fn restore(args: RestoreArgs) -> Result<()> {
    let store =
        Store::open_reader(&args.store).with_context(|| format!("opening store {}", args.store.display()))?;
    let reader = store.open_point(&args.disk, args.point)?;
    let info = reader.info().clone();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(reader.size())
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = restore_file(&reader, &args.output, &mut |done, _total| bar.set_position(done))
        .with_context(|| format!("restoring to {}", args.output.display()))?;
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({
            "disk": args.disk, "point": info.id, "generation": info.generation,
            "consistency": info.consistency, "output": args.output,
            "bytes_written": report.bytes_written, "bytes_zero": report.bytes_zero,
        })
    );
    Ok(())
}

/// Restores `reader`'s point to `output`. A block device is written in place; a file is
/// written under a temporary name in the same directory and renamed over `output` once
/// complete and fsynced (then the directory is fsynced), so `output` is either the whole
/// point or untouched. The temporary is removed when the restore fails.
fn restore_file(
    reader: &server::PointReader,
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<server::RestoreReport> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::metadata(output).is_ok_and(|m| m.file_type().is_block_device()) {
        return Ok(reader.restore_to(output, progress)?);
    }
    let name = output.file_name().with_context(|| format!("{} names no file", output.display()))?;
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".restoring-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let done = reader.restore_to(&tmp, progress).map_err(anyhow::Error::from).and_then(|report| {
        std::fs::rename(&tmp, output)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), output.display()))?;
        Ok(report)
    });
    let report = match done {
        Ok(report) => report,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync the directory {}", dir.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use server::{Consistency, GenerationKind};

    /// A store with one point of a 1 MiB disk: 256 KiB of data at 256 KiB, the rest zeroes.
    /// Returns the data and its chunk's file.
    fn store_with_point(root: &Path) -> (Store, Vec<u8>, PathBuf) {
        let store = Store::open(root).unwrap();
        store.register_disk("d", 1 << 20, 4096).unwrap();
        let data: Vec<u8> = (0..256u32 << 10).map(|i| (i * 7 % 251) as u8).collect();
        let hash = *blake3::hash(&data).as_bytes();
        store.put_chunk(&hash, data.len() as u32, &zstd::bulk::compress(&data, 1).unwrap()).unwrap();
        let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
        p.add_chunk(256 << 10, data.len() as u32, hash).unwrap();
        p.commit(1, Consistency::Crash).unwrap();
        let name: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let chunk = walk(root).into_iter().find(|f| f.file_name().is_some_and(|n| n == name.as_str()));
        (store, data, chunk.expect("the chunk's file"))
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn a_failed_restore_leaves_the_output_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (store, data, chunk) = store_with_point(&dir.path().join("store"));
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("disk.img");

        // A whole restore: the point, and nothing else in the directory.
        let reader = store.open_point("d", PointSel::Latest).unwrap();
        restore_file(&reader, &out, &mut |_, _| {}).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert!(got[256 << 10..512 << 10] == data[..]);
        assert_eq!(walk(&out_dir), std::slice::from_ref(&out));

        // A corrupt chunk: the restore fails, the earlier image is untouched, no temporary
        // is left behind.
        std::fs::write(&out, b"before").unwrap();
        let mut bytes = std::fs::read(&chunk).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0xff;
        std::fs::write(&chunk, bytes).unwrap();
        let reader = store.open_point("d", PointSel::Latest).unwrap();
        assert!(restore_file(&reader, &out, &mut |_, _| {}).is_err());
        assert!(std::fs::read(&out).unwrap() == b"before", "a failed restore replaced the image");
        assert_eq!(walk(&out_dir), std::slice::from_ref(&out));
        // No image at all before: none after.
        std::fs::remove_file(&out).unwrap();
        assert!(restore_file(&reader, &out, &mut |_, _| {}).is_err());
        assert!(walk(&out_dir).is_empty());
    }
}

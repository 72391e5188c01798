//! `siterep certs init DIR`: a private CA, a server certificate and enrolled agent
//! certificates for a quick start with mutual TLS.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use server::net::{EnrolledAgent, Enrollment};

#[derive(Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    action: CertsAction,
}

#[derive(Subcommand, Debug)]
enum CertsAction {
    /// Create DIR/ca.pem, DIR/server.pem+key, one agent-NAME.pem+key per --agent, and
    /// DIR/enrollment.json (give it to `siterep server --enrollment`).
    Init {
        dir: PathBuf,
        /// Names the server's certificate is valid for (besides 127.0.0.1 and ::1).
        #[arg(long = "server-name", default_value = "localhost")]
        server_names: Vec<String>,
        /// An agent and the disks it may write: NAME=DISK[,DISK...] (`*` for any disk).
        #[arg(long = "agent", value_name = "NAME=DISKS", default_value = "agent=*")]
        agents: Vec<String>,
    },
}

pub fn certs(args: CertsArgs) -> Result<()> {
    match args.action {
        CertsAction::Init { dir, server_names, agents } => init(&dir, &server_names, &agents),
    }
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

fn init(dir: &Path, server_names: &[String], agents: &[String]) -> Result<()> {
    if dir.join("ca.key").exists() {
        bail!("{} already holds a CA; refusing to overwrite it", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    // A name of its own per CA (from its key): two CAs of one name make a peer look up the
    // wrong issuer, and the failure reads as a bad signature instead of an unknown CA.
    let id = blake3::hash(ca_key.public_key_raw()).to_hex();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, format!("siterep CA {}", &id[..12]));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    write_private(&dir.join("ca.key"), &ca_key.serialize_pem())?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;

    let mut names = server_names.to_vec();
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, server_names.first().map(String::as_str).unwrap_or("siterep"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_private(&dir.join("server.key"), &key.serialize_pem())?;
    std::fs::write(dir.join("server.pem"), cert.pem())?;

    let mut enrolled = Vec::new();
    for spec in agents {
        let (name, disks) =
            spec.split_once('=').with_context(|| format!("--agent {spec:?}: expected NAME=DISKS"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("--agent {spec:?}: the name may use letters, digits, '-', '_' and '.'");
        }
        let disks: Vec<String> = disks.split(',').filter(|d| !d.is_empty()).map(String::from).collect();
        if disks.is_empty() {
            bail!("--agent {spec:?}: name at least one disk (or *)");
        }
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write_private(&dir.join(format!("agent-{name}.key")), &key.serialize_pem())?;
        std::fs::write(dir.join(format!("agent-{name}.pem")), cert.pem())?;
        enrolled.push(EnrolledAgent {
            name: name.to_string(),
            fingerprint: Enrollment::fingerprint(cert.der()),
            disks,
        });
    }
    Enrollment::save(&enrolled, &dir.join("enrollment.json"))?;
    println!("CA, server and {} agent certificate(s) in {}", enrolled.len(), dir.display());
    for a in &enrolled {
        println!("  agent-{}.pem may write: {}", a.name, a.disks.join(", "));
    }
    Ok(())
}

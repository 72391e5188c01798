//! Who may connect and what each agent may do: the enrollment of agent certificates, the
//! peer a certificate names, and one session per disk.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;

use super::metrics::Metrics;

/// Which disks each agent certificate may write.
///
/// An agent is known by the blake3 fingerprint of its certificate (DER). `agents: None`:
/// every agent with a certificate the CA signed may write every disk.
#[derive(Clone, Debug, Default)]
pub struct Enrollment {
    pub agents: Option<HashMap<String, EnrolledAgent>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EnrolledAgent {
    pub name: String,
    pub fingerprint: String,
    /// Disk names, or `*` for any.
    pub disks: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EnrollmentFile {
    version: u32,
    agents: Vec<EnrolledAgent>,
}

impl Enrollment {
    /// Reads an enrollment file (`siterep certs init` writes one).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let f: EnrollmentFile = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not an enrollment file: {e}", path.display()))?;
        if f.version != 1 {
            return Err(format!("{}: unsupported enrollment version {}", path.display(), f.version));
        }
        Ok(Self { agents: Some(f.agents.into_iter().map(|a| (a.fingerprint.clone(), a)).collect()) })
    }

    /// Writes an enrollment file.
    pub fn save(agents: &[EnrolledAgent], path: &std::path::Path) -> io::Result<()> {
        let f = EnrollmentFile { version: 1, agents: agents.to_vec() };
        std::fs::write(path, serde_json::to_vec_pretty(&f).map_err(io::Error::other)?)
    }

    /// The fingerprint of a certificate (DER).
    pub fn fingerprint(der: &[u8]) -> String {
        blake3::hash(der).to_hex().to_string()
    }

    pub(super) fn allows(&self, fingerprint: Option<&str>, disk: &str) -> Result<(), String> {
        let Some(agents) = &self.agents else { return Ok(()) };
        let Some(fp) = fingerprint else { return Err("no client certificate".into()) };
        match agents.get(fp) {
            None => Err("this agent's certificate is not enrolled".into()),
            Some(a) if a.disks.iter().any(|d| d == "*" || d == disk) => Ok(()),
            Some(a) => Err(format!("agent {} is not enrolled for disk {disk}", a.name)),
        }
    }
}

/// How agents reach the server and what they may do.
pub struct Access {
    /// `None`: plaintext (`--insecure`, loopback only).
    pub tls: Option<Arc<ServerConfig>>,
    pub enrollment: Enrollment,
    pub metrics: Arc<Metrics>,
    /// Which disks are in a session now (one session per disk).
    pub sessions: Sessions,
}

/// The disks in a session now, and who holds each: a disk allows one agent session at a time
/// (`docs/wire.md` §6.2).
#[derive(Debug, Default)]
pub struct Sessions(std::sync::Mutex<HashMap<String, String>>);

/// A disk held by a session, released when dropped.
pub(super) struct DiskClaim<'a> {
    sessions: &'a Sessions,
    disk: String,
}

impl Drop for DiskClaim<'_> {
    fn drop(&mut self) {
        self.sessions.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.disk);
    }
}

/// How long a session waits for another session of the same disk to end before it answers
/// `ERR_BUSY`: an agent that reconnects at once may find its previous session still closing.
const CLAIM_WAIT: Duration = Duration::from_secs(3);

impl Sessions {
    /// Claims `disk` for `holder`, waiting up to [`CLAIM_WAIT`] for a session that holds it to
    /// end; `Err` names the holder.
    pub(super) fn claim(&self, disk: &str, holder: &str) -> Result<DiskClaim<'_>, String> {
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        loop {
            {
                let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
                match held.get(disk) {
                    None => {
                        held.insert(disk.to_string(), holder.to_string());
                        return Ok(DiskClaim { sessions: self, disk: disk.to_string() });
                    }
                    Some(other) if std::time::Instant::now() >= deadline => return Err(other.clone()),
                    Some(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) addr: Option<std::net::SocketAddr>,
    /// blake3 of its certificate (DER), as the enrollment names it; `None` without TLS.
    pub(super) fingerprint: Option<String>,
    /// The certificate's subject common name.
    pub(super) cn: Option<String>,
    /// The certificate's DNS subject alternative names.
    pub(super) san: Vec<String>,
    /// The agent's name in the enrollment, when the certificate is enrolled.
    pub(super) enrolled: Option<String>,
}

impl Peer {
    pub(super) fn of(
        addr: std::net::SocketAddr,
        cert: Option<&CertificateDer<'_>>,
        enrollment: &Enrollment,
    ) -> Self {
        let mut p = Peer { addr: Some(addr), ..Peer::default() };
        let Some(cert) = cert else { return p };
        let fp = Enrollment::fingerprint(cert);
        // rustls verified this certificate with the same parser: it parses.
        if let Ok(c) = webpki::EndEntityCert::try_from(cert) {
            p.cn = common_name(c.subject());
            p.san = c.valid_dns_names().map(str::to_string).collect();
        }
        p.enrolled = enrollment.agents.as_ref().and_then(|a| a.get(&fp)).map(|a| a.name.clone());
        p.fingerprint = Some(fp);
        p
    }
}

/// The first DER element of `der`: its tag, its contents, and what follows it.
fn der_next(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |a, &b| a << 8 | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The common name (OID 2.5.4.3) in a certificate subject (the contents of its `Name`).
fn common_name(subject: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut rdns = subject;
    while let Some((0x31, mut set, rest)) = der_next(rdns) {
        rdns = rest;
        while let Some((0x30, attribute, more)) = der_next(set) {
            set = more;
            if let Some((0x06, CN, value)) = der_next(attribute) {
                let (_, text, _) = der_next(value)?;
                return Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    None
}

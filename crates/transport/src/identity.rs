//! A node's identity: an Ed25519 key pair and a self-signed certificate in the state directory,
//! and the node ID that names it (a fingerprint of the public key).

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::validity::{Seconds, Standing, Validity};

/// File names inside the state directory.
const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";

/// A node's ID: BLAKE3 of its certificate's SubjectPublicKeyInfo, written as 52 base32
/// characters in four dash-separated groups of 13.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

/// Why a string is not a node ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a node ID ({0}): expected 52 base32 characters (A-Z, 2-7), as `syncd id` prints")]
pub struct NodeIdError(&'static str);

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

impl NodeId {
    /// The ID of a public key, given as DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> NodeId {
        let mut h = blake3::Hasher::new();
        h.update(b"syncd node id v1\0");
        h.update(spki_der);
        NodeId(*h.finalize().as_bytes())
    }

    /// The ID of the key in a DER certificate.
    pub fn of_certificate(cert: &[u8]) -> Result<NodeId, rustls::Error> {
        let der = CertificateDer::from(cert);
        let parsed = rustls::server::ParsedCertificate::try_from(&der)?;
        Ok(NodeId::of_spki(parsed.subject_public_key_info().as_ref()))
    }

    fn base32(&self) -> String {
        let mut out = String::with_capacity(52);
        let (mut acc, mut bits) = (0u32, 0u32);
        for &b in &self.0 {
            acc = (acc << 8) | b as u32;
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
        }
        out
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.base32();
        write!(f, "{}-{}-{}-{}", &s[..13], &s[13..26], &s[26..39], &s[39..])
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", &self.base32()[..13])
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    /// Accepts the printed form, with or without dashes, in either case.
    fn from_str(s: &str) -> Result<Self, NodeIdError> {
        let chars: Vec<u8> = s
            .bytes()
            .filter(|b| *b != b'-' && !b.is_ascii_whitespace())
            .map(|b| b.to_ascii_uppercase())
            .collect();
        if chars.len() != 52 {
            return Err(NodeIdError("wrong length"));
        }
        let mut out = [0u8; 32];
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for c in chars {
            let v = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or(NodeIdError("invalid character"))? as u32;
            acc = (acc << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out[n] = (acc >> bits) as u8;
                n += 1;
            }
        }
        // 52 * 5 = 260 bits: the last 4 must be zero for the form to be canonical.
        if acc & ((1 << bits) - 1) != 0 {
            return Err(NodeIdError("trailing bits set"));
        }
        Ok(NodeId(out))
    }
}

/// A node's key pair and certificate.
pub struct Identity {
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
    id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why an identity could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No identity in the state directory.
    #[error("no node identity in {dir}: run `syncd init --state-dir {dir}` first")]
    Missing {
        /// The state directory.
        dir: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The private key is readable by others than its owner.
    #[error(
        "{path} has mode {mode:o}: the private key must be readable by its owner only (chmod 600)"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The key or certificate does not parse, or they do not belong together.
    #[error("{path}: invalid identity file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Identity {
    /// Loads the identity in `dir`, or creates one if there is none. Returns whether it was created.
    pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), IdentityError> {
        match Identity::load(dir) {
            Ok(id) => Ok((id, false)),
            Err(IdentityError::Missing { .. }) => Ok((Identity::create(dir)?, true)),
            Err(e) => Err(e),
        }
    }

    /// Loads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if !key_path.exists() && !cert_path.exists() {
            return Err(IdentityError::Missing {
                dir: dir.to_owned(),
            });
        }
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        let mode = fs::metadata(&key_path)
            .map_err(io_err(&key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyPermissions {
                path: key_path,
                mode: mode & 0o7777,
            });
        }
        let key_der = fs::read(&key_path).map_err(io_err(&key_path))?;
        let cert_der = fs::read(&cert_path).map_err(io_err(&cert_path))?;
        let invalid = |path: &Path, reason: String| IdentityError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let key_pair = rcgen::KeyPair::try_from(key_der.as_slice())
            .map_err(|e| invalid(&key_path, e.to_string()))?;
        let id =
            NodeId::of_certificate(&cert_der).map_err(|e| invalid(&cert_path, e.to_string()))?;
        if NodeId::of_spki(&rcgen::PublicKeyData::subject_public_key_info(&key_pair)) != id {
            return Err(invalid(
                &cert_path,
                format!("certificate does not match {KEY_FILE}"),
            ));
        }
        let validity = Validity::of_certificate(&cert_der)
            .ok_or_else(|| invalid(&cert_path, "no validity period".to_owned()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        match validity.standing(Seconds(now)) {
            Standing::Valid => {}
            Standing::Expired(at) => {
                return Err(invalid(
                    &cert_path,
                    format!(
                        "the certificate expired on {at}; create a new identity with `syncd init` in a new state directory and update the peers' configs"
                    ),
                ));
            }
            Standing::NotYetValid(from) => {
                return Err(invalid(
                    &cert_path,
                    format!("the certificate is valid only from {from}; is the clock right?"),
                ));
            }
        }
        Ok(Identity {
            key_der,
            cert_der,
            id,
        })
    }

    /// Creates a new key pair and certificate in `dir` (created with mode 0700 if absent).
    /// The certificate is valid from 1975 to 4096: identities are pinned by key, and replaced on
    /// purpose rather than on a schedule.
    pub fn create(dir: &Path) -> Result<Identity, IdentityError> {
        Identity::create_valid_between(dir, (1975, 1, 1), (4096, 1, 1))
    }

    /// [`Identity::create`] with a chosen validity period (year, month, day; UTC midnight), for
    /// tests of expired and not-yet-valid peers. The result is not loadable outside the period.
    #[doc(hidden)]
    pub fn create_valid_between(
        dir: &Path,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Result<Identity, IdentityError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }
        let invalid = |reason: String| IdentityError::Invalid {
            path: dir.to_owned(),
            reason,
        };
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| invalid(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec!["syncd".to_owned()])
            .map_err(|e| invalid(e.to_string()))?;
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "syncd node");
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| invalid(e.to_string()))?;
        let key_der = key_pair.serialize_der();
        let cert_der = cert.der().to_vec();
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        write_new(&key_path, &key_der, 0o600).map_err(io_err(&key_path))?;
        write_new(&cert_path, &cert_der, 0o644).map_err(io_err(&cert_path))?;
        let id = NodeId::of_spki(&rcgen::PublicKeyData::subject_public_key_info(&key_pair));
        Ok(Identity {
            key_der,
            cert_der,
            id,
        })
    }

    /// This node's ID.
    pub fn id(&self) -> NodeId {
        self.id
    }

    pub(crate) fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert_der.clone())]
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Writes a new file with `mode` from the start (never briefly world-readable), durably.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_gives_the_same_id_and_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (a, created) = Identity::load_or_create(&state).unwrap();
        assert!(created);
        let (b, created) = Identity::load_or_create(&state).unwrap();
        assert!(!created);
        assert_eq!(a.id(), b.id());
        let mode = fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::create(dir.path()).unwrap();
        fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::KeyPermissions { .. })
        ));
    }

    #[test]
    fn a_certificate_of_another_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Identity::create(a.path()).unwrap();
        Identity::create(b.path()).unwrap();
        fs::copy(b.path().join(CERT_FILE), a.path().join(CERT_FILE)).unwrap();
        assert!(matches!(
            Identity::load(a.path()),
            Err(IdentityError::Invalid { .. })
        ));
    }

    #[test]
    fn node_ids_print_and_parse() {
        let id = NodeId::of_spki(b"some key");
        let s = id.to_string();
        assert_eq!(s.len(), 55);
        assert_eq!(s.parse::<NodeId>().unwrap(), id);
        assert_eq!(
            s.replace('-', "").to_lowercase().parse::<NodeId>().unwrap(),
            id
        );
        assert!("ABC".parse::<NodeId>().is_err());
        let mut bad = s.clone();
        bad.replace_range(0..1, "1");
        assert_eq!(bad.parse::<NodeId>(), Err(NodeIdError("invalid character")));
    }

    #[test]
    fn missing_identity_says_how_to_create_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("syncd init"), "{err}");
    }
}

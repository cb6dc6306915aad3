//! Signing with minisign (ed25519). The signed data is the image manifest blob; the trusted
//! comment (v2) binds the signature to `image=OWNER/NAME version=VERSION digest=sha256:HEX
//! time=...`, so a valid signature cannot be moved to another image name or version. Trusted
//! keys are scoped per owner: a key verifies only the owners it is trusted for.

use forkd_store::Home;
use minisign::{KeyPair, PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};
use std::io::Cursor;
use std::path::{Path, PathBuf};

pub const SECRET_KEY_FILE: &str = "forkd.key";
pub const PUBLIC_KEY_FILE: &str = "forkd.pub";
/// Environment variable with the password of an encrypted secret key (empty: unencrypted).
pub const PASSWORD_ENV: &str = "FORKD_KEY_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {msg}")]
    Key { what: String, msg: String },
    #[error("no signing key at {}", .0.display())]
    NoSigningKey(PathBuf),
    #[error("refusing to overwrite the existing key {0} (remove it first)")]
    Exists(PathBuf),
    #[error("the image is not signed")]
    Unsigned,
    #[error(
        "no trusted public key signed this image (signature key id {key_id}); trusted keys: {trusted}"
    )]
    UntrustedKey { key_id: String, trusted: usize },
    #[error("signature verification failed: {0}")]
    Invalid(String),
    #[error("the signature does not match where it was found: {why} (signed subject {signed:?})")]
    WrongSubject { signed: String, why: String },
    #[error(
        "key {key_id} is not trusted for images of {owner:?} (it is trusted for: {owners}); trust it with `forkd key trust {owner} KEY` if {owner} really uses it"
    )]
    WrongOwner {
        key_id: String,
        owner: String,
        owners: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |source| SignError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn password() -> String {
    std::env::var(PASSWORD_ENV).unwrap_or_default()
}

/// Generate a key pair into `dir` (made 0700 if missing; `forkd.key` 0600, `forkd.pub` 0644,
/// whatever the umask); returns the public key line.
pub fn generate(dir: &Path) -> Result<(PathBuf, PathBuf, String), SignError> {
    let sk_path = dir.join(SECRET_KEY_FILE);
    let pk_path = dir.join(PUBLIC_KEY_FILE);
    if sk_path.exists() {
        return Err(SignError::Exists(sk_path));
    }
    // Missing directories are made 0700, whatever the umask.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(io(dir))?;
    let key_err = |msg: minisign::PError| SignError::Key {
        what: "key generation".into(),
        msg: msg.to_string(),
    };
    let kp = KeyPair::generate_encrypted_keypair(Some(password())).map_err(key_err)?;
    let sk_text = kp
        .sk
        .to_box(Some("forkd secret key"))
        .map_err(key_err)?
        .to_string();
    let pk_text = kp.pk.to_box().map_err(key_err)?.to_string();
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&sk_path)
            .map_err(io(&sk_path))?;
        f.write_all(sk_text.as_bytes()).map_err(io(&sk_path))?;
    }
    {
        // Public by nature, but never writable by others, whatever the umask.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&pk_path)
            .map_err(io(&pk_path))?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io(&pk_path))?;
        f.write_all(pk_text.as_bytes()).map_err(io(&pk_path))?;
    }
    Ok((sk_path, pk_path, kp.pk.to_base64()))
}

pub fn load_secret_key(path: &Path) -> Result<SecretKey, SignError> {
    let text = fs_err::read_to_string(path).map_err(io(path))?;
    SecretKeyBox::from_string(&text)
        .and_then(|b| b.into_secret_key(Some(password())))
        .map_err(|e| SignError::Key {
            what: path.display().to_string(),
            msg: format!("{e} (encrypted keys take their password from {PASSWORD_ENV})"),
        })
}

/// The key `forkd push` signs with: `given`, else `keys/forkd.key` in `home`.
pub fn signing_key(home: &Home, given: Option<&Path>) -> Result<SecretKey, SignError> {
    let path = given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| home.keys_dir().join(SECRET_KEY_FILE));
    if !path.exists() {
        return Err(SignError::NoSigningKey(path));
    }
    load_secret_key(&path)
}

/// Who a trusted key may sign for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Images of this owner only (`OWNER KEY` in trusted-keys, `forkd key trust OWNER KEY`,
    /// or `--trust KEY` on a pull, which trusts it for that pull's owner).
    Owner(String),
    /// This host's own key (`forkd key generate`): it signs what this host pushes, under any
    /// owner.
    Own,
    /// A bare `KEY` line from before keys were scoped: still accepted, with a warning that
    /// names the command that scopes it.
    Legacy,
}

/// A public key and the owners it may sign for.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub key: PublicKey,
    pub scope: Scope,
}

impl TrustedKey {
    /// The key id as minisign prints it (16 upper-case hex digits).
    pub fn key_id(&self) -> String {
        key_id(self.key.keynum())
    }

    fn allows(&self, owner: &str) -> bool {
        match &self.scope {
            Scope::Owner(o) => o == owner,
            Scope::Own | Scope::Legacy => true,
        }
    }
}

fn key_id(keynum: &[u8]) -> String {
    hex::encode_upper(keynum.iter().rev().copied().collect::<Vec<u8>>())
}

/// The keys `home` trusts: its `trusted-keys` file, and its own public key from `forkd key
/// generate` if there is one.
pub fn trusted_keys(home: &Home) -> Result<Vec<TrustedKey>, SignError> {
    let mut keys = read_trusted_keys(&home.trusted_keys())?;
    let own = home.keys_dir().join(PUBLIC_KEY_FILE);
    if own.is_file() {
        keys.push(TrustedKey {
            key: parse_public_key(own.to_str().unwrap_or_default())?,
            scope: Scope::Own,
        });
    }
    Ok(keys)
}

/// Largest trusted-keys file read (one line per key: a few hundred thousand keys).
const MAX_TRUSTED_KEYS_BYTES: u64 = 16 << 20;

/// Keys from a trusted-keys file: `OWNER KEY` per line (a base64 minisign public key trusted
/// for OWNER's images), or a bare `KEY` (from before keys were scoped: [`Scope::Legacy`]);
/// `#` comments and `untrusted comment:` lines are ignored. A missing file is an empty list.
pub fn read_trusted_keys(path: &Path) -> Result<Vec<TrustedKey>, SignError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(path)(e)),
    };
    let mut text = String::new();
    file.take(MAX_TRUSTED_KEYS_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io(path))?;
    if text.len() as u64 > MAX_TRUSTED_KEYS_BYTES {
        return Err(SignError::Key {
            what: path.display().to_string(),
            msg: format!("larger than {MAX_TRUSTED_KEYS_BYTES} bytes"),
        });
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("untrusted comment:"))
        .map(|l| {
            let bad = |msg: String| SignError::Key {
                what: path.display().to_string(),
                msg: format!("bad key line {l:?}: {msg}"),
            };
            let (scope, b64) = match l.split_once(char::is_whitespace) {
                Some((owner, key)) => {
                    if !crate::reference::is_name(owner) {
                        return Err(bad(format!(
                            "{owner:?} is not an owner name ([a-z0-9][a-z0-9._-]*)"
                        )));
                    }
                    (Scope::Owner(owner.to_string()), key.trim())
                }
                None => (Scope::Legacy, l),
            };
            let key = PublicKey::from_base64(b64).map_err(|e| bad(e.to_string()))?;
            Ok(TrustedKey { key, scope })
        })
        .collect()
}

/// Add `OWNER KEY` to the trusted-keys file at `path` (created 0600 if missing). Returns false
/// when that exact entry was already there.
pub fn trust(path: &Path, owner: &str, key: &PublicKey) -> Result<bool, SignError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !crate::reference::is_name(owner) {
        return Err(SignError::Key {
            what: "owner".into(),
            msg: format!("{owner:?} is not an owner name ([a-z0-9][a-z0-9._-]*)"),
        });
    }
    let present = read_trusted_keys(path)?
        .into_iter()
        .any(|k| k.key.keynum() == key.keynum() && k.scope == Scope::Owner(owner.to_string()));
    if present {
        return Ok(false);
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{owner} {}", key.to_base64()).map_err(io(path))?;
    Ok(true)
}

/// The prefix of a v1 subject (no version, no time; still read, with a warning).
const SUBJECT_V1: &str = "forkd-hub/1";
/// The prefix of a v2 subject.
const SUBJECT_V2: &str = "forkd-hub/2";

/// What a signature is bound to: its trusted comment. v2:
/// `forkd-hub/2 image=OWNER/NAME version=VERSION digest=sha256:HEX time=RFC3339`;
/// v1 (read only): `forkd-hub/1 image=OWNER/NAME digest=sha256:HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub image: String,
    /// `None` in a v1 subject.
    pub version: Option<String>,
    pub digest: String,
    /// When it was signed (RFC 3339); `None` in a v1 subject.
    pub time: Option<String>,
}

impl Subject {
    /// A v2 subject signed now.
    pub fn new(image: &str, version: &str, digest: &str) -> Subject {
        Subject {
            image: image.to_string(),
            version: Some(version.to_string()),
            digest: digest.to_string(),
            time: Some(
                jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                    .unwrap_or_else(|_| jiff::Timestamp::now())
                    .to_string(),
            ),
        }
    }

    /// The trusted comment text.
    pub fn render(&self) -> String {
        match (&self.version, &self.time) {
            (Some(v), Some(t)) => format!(
                "{SUBJECT_V2} image={} version={v} digest={} time={t}",
                self.image, self.digest
            ),
            _ => format!("{SUBJECT_V1} image={} digest={}", self.image, self.digest),
        }
    }

    /// Parse a trusted comment; `None` when it is not a forkd subject of a known version.
    pub fn parse(text: &str) -> Option<Subject> {
        let mut words = text.split(' ');
        let v2 = match words.next()? {
            SUBJECT_V1 => false,
            SUBJECT_V2 => true,
            _ => return None,
        };
        let mut field = |key: &str| -> Option<String> {
            let (k, v) = words.next()?.split_once('=')?;
            (k == key && !v.is_empty()).then(|| v.to_string())
        };
        let image = field("image")?;
        let version = if v2 { Some(field("version")?) } else { None };
        let digest = field("digest")?;
        let time = if v2 { Some(field("time")?) } else { None };
        if words.next().is_some() {
            return None;
        }
        if version
            .as_deref()
            .is_some_and(|v| !crate::reference::is_version(v))
            || time
                .as_deref()
                .is_some_and(|t| t.parse::<jiff::Timestamp>().is_err())
        {
            return None;
        }
        Some(Subject {
            image,
            version,
            digest,
            time,
        })
    }
}

/// Sign the manifest blob for `subject`; returns the minisign signature text.
pub fn sign(sk: &SecretKey, manifest: &[u8], subject: &Subject) -> Result<String, SignError> {
    let comment = subject.render();
    let sig = minisign::sign(
        None,
        sk,
        Cursor::new(manifest),
        Some(&comment),
        Some("signed by forkd push"),
    )
    .map_err(|e| SignError::Key {
        what: "signing".into(),
        msg: e.to_string(),
    })?;
    Ok(sig.to_string())
}

/// Parse a public key: a base64 minisign key, or the text of a `.pub` file, or a path to one.
pub fn parse_public_key(s: &str) -> Result<PublicKey, SignError> {
    let s = s.trim();
    let text = if Path::new(s).is_file() {
        fs_err::read_to_string(s).map_err(io(Path::new(s)))?
    } else {
        s.to_string()
    };
    let err = |e: minisign::PError| SignError::Key {
        what: "public key".into(),
        msg: e.to_string(),
    };
    if text.contains("untrusted comment:") {
        PublicKeyBox::from_string(&text)
            .and_then(|b| b.into_public_key())
            .map_err(err)
    } else {
        PublicKey::from_base64(text.trim()).map_err(err)
    }
}

/// What a pull expects a signature to say.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// `OWNER/NAME` from the tag file's path.
    pub image: &'a str,
    pub owner: &'a str,
    /// The VERSION of the tag file's path; `None` for a digest pin (`_digests/HEX.json`).
    pub version: Option<&'a str>,
    /// The digest the tag file names.
    pub digest: &'a str,
}

/// A signature that verified.
#[derive(Debug, Clone)]
pub struct Verified {
    pub key_id: String,
    pub subject: Subject,
    /// Things the user should hear (a v1 signature, a key trusted for any owner).
    pub warnings: Vec<String>,
}

/// Verify `signature` over `manifest` against `trusted`: the key must be trusted for the
/// expected owner, the signature valid, and its subject must name the expected image, digest
/// and (v2) version.
pub fn verify(
    signature: Option<&str>,
    manifest: &[u8],
    expected: &Expected<'_>,
    trusted: &[TrustedKey],
) -> Result<Verified, SignError> {
    let text = signature.ok_or(SignError::Unsigned)?;
    let sig = SignatureBox::from_string(text).map_err(|e| SignError::Invalid(e.to_string()))?;
    let key_id = key_id(sig.keynum());
    let same_key: Vec<&TrustedKey> = trusted
        .iter()
        .filter(|k| k.key.keynum() == sig.keynum())
        .collect();
    let Some(tk) = same_key
        .iter()
        .find(|k| matches!(&k.scope, Scope::Owner(o) if o == expected.owner))
        .or_else(|| same_key.iter().find(|k| k.allows(expected.owner)))
    else {
        if same_key.is_empty() {
            return Err(SignError::UntrustedKey {
                key_id,
                trusted: trusted.len(),
            });
        }
        return Err(SignError::WrongOwner {
            key_id,
            owner: expected.owner.to_string(),
            owners: same_key
                .iter()
                .filter_map(|k| match &k.scope {
                    Scope::Owner(o) => Some(o.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    minisign::verify(&tk.key, &sig, Cursor::new(manifest), true, false, false)
        .map_err(|e| SignError::Invalid(e.to_string()))?;
    let signed = sig
        .trusted_comment()
        .map_err(|e| SignError::Invalid(e.to_string()))?;
    let wrong = |why: String| SignError::WrongSubject {
        signed: signed.clone(),
        why,
    };
    let subject = Subject::parse(&signed).ok_or_else(|| wrong("not a forkd subject".into()))?;
    if subject.image != expected.image {
        return Err(wrong(format!("it names image {}", subject.image)));
    }
    if subject.digest != expected.digest {
        return Err(wrong(format!("it names digest {}", subject.digest)));
    }
    let mut warnings = Vec::new();
    match (&subject.version, expected.version) {
        (Some(signed_v), Some(v)) if signed_v != v => {
            return Err(wrong(format!(
                "it was signed for version {signed_v}, but was found as version {v} (a tag file copied over another)"
            )));
        }
        (None, _) => warnings.push(format!(
            "{} is signed with a v1 signature, which does not name a version: a hub could serve another validly signed version of {} in its place; the publisher should push it again with this forkd",
            expected.image, expected.image
        )),
        _ => {}
    }
    if tk.scope == Scope::Legacy {
        warnings.push(format!(
            "key {key_id} is trusted for every owner (a bare line in trusted-keys); scope it with `forkd key trust {} {}`",
            expected.owner,
            tk.key.to_base64()
        ));
    }
    Ok(Verified {
        key_id,
        subject,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp<'a>(image: &'a str, version: Option<&'a str>, digest: &'a str) -> Expected<'a> {
        Expected {
            image,
            owner: image.split('/').next().unwrap(),
            version,
            digest,
        }
    }

    #[test]
    fn sign_verify_roundtrip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let (sk_path, pk_path, _) = generate(dir.path()).unwrap();
        let sk = load_secret_key(&sk_path).unwrap();
        let key = parse_public_key(pk_path.to_str().unwrap()).unwrap();
        let pk = TrustedKey {
            key,
            scope: Scope::Owner("a".into()),
        };
        let d = "sha256:00";
        let sig = sign(&sk, b"manifest", &Subject::new("a/b", "1", d)).unwrap();
        let ok = verify(
            Some(&sig),
            b"manifest",
            &exp("a/b", Some("1"), d),
            std::slice::from_ref(&pk),
        )
        .unwrap();
        assert_eq!(ok.subject.version.as_deref(), Some("1"));
        assert!(ok.warnings.is_empty());
        // A digest pin does not name a version.
        verify(
            Some(&sig),
            b"manifest",
            &exp("a/b", None, d),
            std::slice::from_ref(&pk),
        )
        .unwrap();
        let one = std::slice::from_ref(&pk);
        assert!(matches!(
            verify(Some(&sig), b"manifesT", &exp("a/b", Some("1"), d), one),
            Err(SignError::Invalid(_))
        ));
        assert!(matches!(
            verify(Some(&sig), b"manifest", &exp("a/c", Some("1"), d), one),
            Err(SignError::WrongSubject { .. })
        ));
        assert!(matches!(
            verify(Some(&sig), b"manifest", &exp("a/b", Some("2"), d), one),
            Err(SignError::WrongSubject { .. })
        ));
        assert!(matches!(
            verify(None, b"m", &exp("a/b", Some("1"), d), one),
            Err(SignError::Unsigned)
        ));
        assert!(matches!(
            verify(Some(&sig), b"manifest", &exp("a/b", Some("1"), d), &[]),
            Err(SignError::UntrustedKey { .. })
        ));
        let other = TrustedKey {
            key: pk.key.clone(),
            scope: Scope::Owner("z".into()),
        };
        assert!(matches!(
            verify(Some(&sig), b"manifest", &exp("a/b", Some("1"), d), &[other]),
            Err(SignError::WrongOwner { .. })
        ));
        let legacy = TrustedKey {
            key: pk.key.clone(),
            scope: Scope::Legacy,
        };
        let v = verify(
            Some(&sig),
            b"manifest",
            &exp("a/b", Some("1"), d),
            &[legacy],
        )
        .unwrap();
        assert_eq!(v.warnings.len(), 1);
    }

    #[test]
    fn v1_subjects_still_verify_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let (sk_path, pk_path, _) = generate(dir.path()).unwrap();
        let sk = load_secret_key(&sk_path).unwrap();
        let pk = TrustedKey {
            key: parse_public_key(pk_path.to_str().unwrap()).unwrap(),
            scope: Scope::Own,
        };
        let v1 = Subject {
            image: "a/b".into(),
            version: None,
            digest: "sha256:00".into(),
            time: None,
        };
        assert_eq!(v1.render(), "forkd-hub/1 image=a/b digest=sha256:00");
        let sig = sign(&sk, b"m", &v1).unwrap();
        let v = verify(Some(&sig), b"m", &exp("a/b", Some("2"), "sha256:00"), &[pk]).unwrap();
        assert_eq!(v.subject.version, None);
        assert!(v.warnings[0].contains("v1 signature"));
    }

    #[test]
    fn subjects_parse_strictly() {
        let s = Subject::new("a/b", "1.0", "sha256:00");
        assert_eq!(Subject::parse(&s.render()), Some(s.clone()));
        for bad in [
            "forkd-hub/3 image=a/b digest=x",
            "forkd-hub/2 image=a/b digest=x",
            "forkd-hub/2 image=a/b version=1 digest=x time=now",
            "forkd-hub/1 image=a/b digest=x extra=1",
            "forkd-hub/2 image=a/b version=../x digest=x time=2026-01-01T00:00:00Z",
        ] {
            assert_eq!(Subject::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn trusted_keys_file_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let (_, pk_path, b64) = generate(dir.path()).unwrap();
        let key = parse_public_key(pk_path.to_str().unwrap()).unwrap();
        let file = dir.path().join("trusted-keys");
        std::fs::write(&file, format!("# old\n{b64}\n")).unwrap();
        assert!(trust(&file, "acme", &key).unwrap());
        assert!(!trust(&file, "acme", &key).unwrap());
        let keys = read_trusted_keys(&file).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].scope, Scope::Legacy);
        assert_eq!(keys[1].scope, Scope::Owner("acme".into()));
        assert!(trust(&file, "Bad Owner", &key).is_err());
        std::fs::write(&file, format!("UPPER {b64}\n")).unwrap();
        assert!(read_trusted_keys(&file).is_err());
    }
}

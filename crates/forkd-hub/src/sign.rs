//! Signing with minisign (ed25519). The signed data is the image manifest blob; the trusted
//! comment binds the signature to `image=OWNER/NAME digest=sha256:HEX`, so a valid signature
//! cannot be moved to another image name.

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
    #[error("the signature was made for {signed:?}, not for {expected:?}")]
    WrongSubject { signed: String, expected: String },
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

/// The keys `home` trusts: its `trusted-keys` file, and its own public key from `forkd key
/// generate` if there is one.
pub fn trusted_keys(home: &Home) -> Result<Vec<PublicKey>, SignError> {
    let mut keys = read_trusted_keys(&home.trusted_keys())?;
    let own = home.keys_dir().join(PUBLIC_KEY_FILE);
    if own.is_file() {
        keys.push(parse_public_key(own.to_str().unwrap_or_default())?);
    }
    Ok(keys)
}

/// The subject a signature is bound to.
pub fn subject(image: &str, digest: &str) -> String {
    format!("forkd-hub/1 image={image} digest={digest}")
}

/// Sign the manifest blob; returns the minisign signature text.
pub fn sign(
    sk: &SecretKey,
    manifest: &[u8],
    image: &str,
    digest: &str,
) -> Result<String, SignError> {
    let comment = subject(image, digest);
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

/// Keys from a trusted-keys file: one base64 minisign public key per line; `#` comments and
/// `untrusted comment:` lines are ignored. A missing file is an empty list.
pub fn read_trusted_keys(path: &Path) -> Result<Vec<PublicKey>, SignError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(path)(e)),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("untrusted comment:"))
        .map(|l| {
            PublicKey::from_base64(l).map_err(|e| SignError::Key {
                what: path.display().to_string(),
                msg: format!("bad key line {l:?}: {e}"),
            })
        })
        .collect()
}

/// Verify `signature` over `manifest` against `trusted`, bound to `image` and `digest`.
pub fn verify(
    signature: Option<&str>,
    manifest: &[u8],
    image: &str,
    digest: &str,
    trusted: &[PublicKey],
) -> Result<(), SignError> {
    let text = signature.ok_or(SignError::Unsigned)?;
    let sig = SignatureBox::from_string(text).map_err(|e| SignError::Invalid(e.to_string()))?;
    let key_id = hex::encode_upper(sig.keynum().iter().rev().copied().collect::<Vec<u8>>());
    let Some(pk) = trusted.iter().find(|k| k.keynum() == sig.keynum()) else {
        return Err(SignError::UntrustedKey {
            key_id,
            trusted: trusted.len(),
        });
    };
    minisign::verify(pk, &sig, Cursor::new(manifest), true, false, false)
        .map_err(|e| SignError::Invalid(e.to_string()))?;
    let signed = sig
        .trusted_comment()
        .map_err(|e| SignError::Invalid(e.to_string()))?;
    let expected = subject(image, digest);
    if signed != expected {
        return Err(SignError::WrongSubject { signed, expected });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_roundtrip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let (sk_path, pk_path, _) = generate(dir.path()).unwrap();
        let sk = load_secret_key(&sk_path).unwrap();
        let pk = parse_public_key(pk_path.to_str().unwrap()).unwrap();
        let d = "sha256:00";
        let sig = sign(&sk, b"manifest", "a/b", d).unwrap();
        verify(Some(&sig), b"manifest", "a/b", d, std::slice::from_ref(&pk)).unwrap();
        assert!(matches!(
            verify(Some(&sig), b"manifesT", "a/b", d, std::slice::from_ref(&pk)),
            Err(SignError::Invalid(_))
        ));
        assert!(matches!(
            verify(Some(&sig), b"manifest", "a/c", d, std::slice::from_ref(&pk)),
            Err(SignError::WrongSubject { .. })
        ));
        assert!(matches!(
            verify(None, b"m", "a/b", d, &[pk]),
            Err(SignError::Unsigned)
        ));
        assert!(matches!(
            verify(Some(&sig), b"manifest", "a/b", d, &[]),
            Err(SignError::UntrustedKey { .. })
        ));
    }
}

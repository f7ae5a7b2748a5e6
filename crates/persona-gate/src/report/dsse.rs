//! Signed receipt bundles: Ed25519 signatures in a DSSE envelope around an in-toto Statement.
//!
//! A receipt's `receipt_sha256` only detects accidents: anyone can edit a receipt and seal it
//! again. A signature says *who* vouches for a bundle: `pgate receipt sign DIR --key KEY` writes
//! `DIR/receipts.dsse.json`, a [DSSE](https://github.com/secure-systems-lab/dsse) envelope
//! (`payloadType` `application/vnd.in-toto+json`) whose payload is an
//! [in-toto Statement v1](https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md):
//! one `subject` per file of the bundle (`bundle.json`, every receipt, `rows.jsonl`,
//! `labels.jsonl`) with its sha256, and `predicateType` [`PREDICATE_TYPE`]. The signature is over
//! the DSSE pre-authentication encoding ([`pae`]) of the payload, so tools that speak DSSE can
//! check it too.
//!
//! Keys are raw Ed25519 keys in one-line text files (`pgate keygen`): the private key file holds
//! the 32-byte seed in hex and is created with mode 0600; `KEY.pub` holds the public key in hex.
//! A key id is the sha256 of the raw public key. Keys are never part of the repository.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::receipt::{Bundle, MAX_RECEIPT_BYTES};
use super::rows::{plain_name, MAX_ROWS_BYTES};
use crate::fsutil;
use crate::{Error, Result};

pub use super::rows::SIGNATURE_FILE;
/// DSSE payload type of an in-toto Statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// What the predicate describes: a persona-gate receipt bundle (a name; never fetched).
pub const PREDICATE_TYPE: &str = "https://example.invalid/persona-gate/receipt-bundle/v1";

const SECRET_TAG: &str = "pgate-ed25519-secret-key-v1";
const PUBLIC_TAG: &str = "pgate-ed25519-public-key-v1";

fn sig_err(msg: impl Into<String>) -> Error {
    Error::Signature(msg.into())
}

/// DSSE pre-authentication encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, the
/// lengths as ASCII decimals. The signature covers the payload type too, so a payload cannot be
/// passed off as another type.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A DSSE envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Base64 (standard alphabet) of the serialized Statement.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// sha256 (hex) of the signer's raw public key; a hint only, never trusted.
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the 64-byte Ed25519 signature over [`pae`].
    pub sig: String,
}

/// An in-toto Statement v1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

/// Key id: sha256 (hex) of the raw 32-byte public key.
pub fn keyid(vk: &VerifyingKey) -> String {
    crate::hash::sha256_bytes(vk.as_bytes())
}

/// The public key file next to a private key: `KEY.pub`.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// Make a new key pair: `key` (the seed, mode 0600) and `key.pub`. Refuses to overwrite either.
/// Returns the public key file and the key id.
pub fn keygen(key: &Path) -> Result<(PathBuf, String)> {
    let public = public_key_path(key);
    for p in [key, public.as_path()] {
        if p.exists() || p.symlink_metadata().is_ok() {
            return Err(Error::InvalidValue(format!(
                "{}: already exists; refusing to overwrite a key",
                p.display()
            )));
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::InvalidValue(format!("no randomness from the OS: {e}")))?;
    let sk = SigningKey::from_bytes(&seed);
    seed.fill(0);
    std::hint::black_box(&seed);
    let vk = sk.verifying_key();
    let secret = format!("{SECRET_TAG} {}\n", hex::encode(sk.to_bytes()));
    fsutil::create_new_private(key, secret.as_bytes())?;
    let text = format!("{PUBLIC_TAG} {}\n", hex::encode(vk.as_bytes()));
    if let Err(e) = fsutil::create_new_private(&public, text.as_bytes()) {
        let _ = std::fs::remove_file(key);
        return Err(e);
    }
    // The public key may be shared: make it readable (it was created owner-only).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&public, e))?;
    }
    Ok((public, keyid(&vk)))
}

/// The 32 bytes after `tag` in a one-line key file.
fn key_bytes(path: &Path, tag: &str) -> Result<[u8; 32]> {
    let text = fsutil::read_text_bounded(path, 4096)?;
    let mut it = text.split_whitespace();
    let (Some(t), Some(hexkey), None) = (it.next(), it.next(), it.next()) else {
        return Err(sig_err(format!(
            "{}: not a key file ('{tag} HEX')",
            path.display()
        )));
    };
    if t != tag {
        return Err(sig_err(format!(
            "{}: a '{t}' file, expected '{tag}'",
            path.display()
        )));
    }
    let v = hex::decode(hexkey)
        .map_err(|_| sig_err(format!("{}: the key is not hex", path.display())))?;
    v.try_into()
        .map_err(|_| sig_err(format!("{}: the key is not 32 bytes", path.display())))
}

/// Read a private key. Refuses a key file others can read (as ssh does).
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(sig_err(format!(
                "{}: the private key is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
    }
    let mut b = key_bytes(path, SECRET_TAG)?;
    let sk = SigningKey::from_bytes(&b);
    b.fill(0);
    std::hint::black_box(&b);
    Ok(sk)
}

/// Read a public key (`KEY.pub`).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey> {
    let b = key_bytes(path, PUBLIC_TAG)?;
    VerifyingKey::from_bytes(&b).map_err(|e| {
        sig_err(format!(
            "{}: not an Ed25519 public key: {e}",
            path.display()
        ))
    })
}

/// The files that make a bundle, by name: `bundle.json`, every receipt it lists, and its rows and
/// labels files.
pub fn bundle_files(bundle: &Bundle) -> Result<Vec<String>> {
    let mut names = vec!["bundle.json".to_string()];
    for e in &bundle.receipts {
        names.push(plain_name(&e.file)?.to_string());
    }
    for f in [&bundle.rows, &bundle.labels].into_iter().flatten() {
        names.push(plain_name(&f.file)?.to_string());
    }
    Ok(names)
}

/// sha256 of one file of the bundle folder (plain name, regular file, bounded).
fn file_sha(dir: &Path, name: &str) -> Result<String> {
    let p = dir.join(plain_name(name)?);
    let max = if name.ends_with(".jsonl") {
        MAX_ROWS_BYTES
    } else {
        MAX_RECEIPT_BYTES
    };
    Ok(fsutil::sha256_regular_bounded(&p, max)?.0)
}

/// Sign the bundle in `dir`: write `dir/receipts.dsse.json` (atomically) over every file of the
/// bundle. Returns the envelope's path and the key id. The caller checks the bundle first
/// (`pgate receipt sign` runs the internal checks of `verify`).
pub fn sign_bundle(dir: &Path, key: &SigningKey) -> Result<(PathBuf, String)> {
    let bundle = Bundle::load(&dir.join("bundle.json"))?;
    let mut subject = Vec::new();
    for name in bundle_files(&bundle)? {
        let sha = file_sha(dir, &name)?;
        subject.push(Subject {
            name,
            digest: BTreeMap::from([("sha256".to_string(), sha)]),
        });
    }
    let vk = key.verifying_key();
    let statement = Statement {
        type_: STATEMENT_TYPE.into(),
        subject,
        predicate_type: PREDICATE_TYPE.into(),
        predicate: json!({
            "study": {"name": bundle.study.name, "hash": bundle.study.hash},
            "policy_version": bundle.policy_version,
            "bundle_schema": bundle.schema,
            "receipts": bundle.receipts,
            "signed_at": crate::study::store::iso_utc(crate::study::store::now_ms()),
            "signer": {
                "software": format!("pgate {}", env!("CARGO_PKG_VERSION")),
                "keyid": keyid(&vk),
            },
        }),
    };
    let payload = serde_json::to_vec(&statement)?;
    let sig = key.sign(&pae(PAYLOAD_TYPE, &payload));
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = Envelope {
        payload: b64.encode(&payload),
        payload_type: PAYLOAD_TYPE.into(),
        signatures: vec![EnvelopeSignature {
            keyid: keyid(&vk),
            sig: b64.encode(sig.to_bytes()),
        }],
    };
    let path = dir.join(SIGNATURE_FILE);
    let text = serde_json::to_string_pretty(&env)? + "\n";
    fsutil::write_atomic(&path, text.as_bytes())?;
    Ok((path, keyid(&vk)))
}

/// What a valid signature covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedBundle {
    /// Key id of the key that verified it.
    pub keyid: String,
    /// Signed files and their sha256, as in the Statement (every one matched the folder).
    pub files: Vec<(String, String)>,
    pub statement: Statement,
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    STANDARD.decode(s).or_else(|_| URL_SAFE.decode(s)).ok()
}

/// Check the signature of the bundle in `dir` with `vk`: the envelope verifies with this key,
/// its Statement is a persona-gate receipt-bundle Statement, every signed file is in the folder
/// unchanged, and every file of the bundle as it is now is signed. Any failure is an error naming
/// it.
pub fn verify_bundle(dir: &Path, vk: &VerifyingKey) -> Result<SignedBundle> {
    let path = dir.join(SIGNATURE_FILE);
    if path.symlink_metadata().is_err() {
        return Err(sig_err(format!(
            "{}: not signed (no {SIGNATURE_FILE}; sign with `pgate receipt sign {} --key KEY`)",
            dir.display(),
            dir.display()
        )));
    }
    let text = fsutil::read_text_bounded(&path, MAX_RECEIPT_BYTES)?;
    let env: Envelope = serde_json::from_str(&text)
        .map_err(|e| sig_err(format!("{}: not a DSSE envelope: {e}", path.display())))?;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(sig_err(format!(
            "{}: payloadType '{}', expected '{PAYLOAD_TYPE}'",
            path.display(),
            env.payload_type
        )));
    }
    let payload = b64_decode(&env.payload)
        .ok_or_else(|| sig_err(format!("{}: payload is not base64", path.display())))?;
    let msg = pae(&env.payload_type, &payload);
    let good = env.signatures.iter().any(|s| {
        b64_decode(&s.sig)
            .and_then(|b| Signature::from_slice(&b).ok())
            .is_some_and(|sig| vk.verify_strict(&msg, &sig).is_ok())
    });
    let want = keyid(vk);
    if !good {
        let ids: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
        return Err(sig_err(format!(
            "{}: no signature verifies with key {} (the envelope names key ids: {})",
            path.display(),
            &want[..16],
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.iter()
                    .map(|i| i.get(..16).unwrap_or(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    let st: Statement = serde_json::from_slice(&payload).map_err(|e| {
        sig_err(format!(
            "{}: payload is not a Statement: {e}",
            path.display()
        ))
    })?;
    if st.type_ != STATEMENT_TYPE || st.predicate_type != PREDICATE_TYPE {
        return Err(sig_err(format!(
            "{}: signed Statement is of type '{}' / '{}', not a persona-gate receipt bundle",
            path.display(),
            st.type_,
            st.predicate_type
        )));
    }
    let mut files = Vec::new();
    for s in &st.subject {
        let want_sha = s
            .digest
            .get("sha256")
            .ok_or_else(|| sig_err(format!("signed file {} has no sha256 digest", s.name)))?;
        let now =
            file_sha(dir, &s.name).map_err(|e| sig_err(format!("signed file {}: {e}", s.name)))?;
        if &now != want_sha {
            return Err(sig_err(format!(
                "signed file {} changed since it was signed (sha256 {} now {})",
                s.name,
                want_sha.get(..16).unwrap_or(want_sha),
                &now[..16]
            )));
        }
        files.push((s.name.clone(), now));
    }
    let bundle = Bundle::load(&dir.join("bundle.json"))?;
    for name in bundle_files(&bundle)? {
        if !files.iter().any(|(n, _)| n == &name) {
            return Err(sig_err(format!(
                "{name} is part of the bundle but not covered by the signature"
            )));
        }
    }
    Ok(SignedBundle {
        keyid: want,
        files,
        statement: st,
    })
}

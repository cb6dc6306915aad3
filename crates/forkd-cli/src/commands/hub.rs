//! Snapshot Hub commands: push, pull, search, key generate, hub serve.

use crate::ctx::Ctx;
use crate::report::{Hint, human_bytes};
use anyhow::{Context, Result};
use forkd_hub::sign::SignError;
use forkd_hub::{HubError, HubOptions, Reference, Transport};
use forkd_store::{Store, Tag};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub struct HubArgs {
    /// Hub URL: file:///DIR, http(s)://HOST/PREFIX, s3://BUCKET/PREFIX [default: file://$FORKD_HOME/hub]
    #[arg(long, env = "FORKD_HUB", value_name = "URL")]
    hub: Option<String>,
    /// File holding the bearer token for writes to `forkd hub serve` (else $FORKD_HUB_TOKEN)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Upload a local image to a hub as OWNER/NAME[:VERSION], signed
    Push {
        /// Local tag to push
        local_tag: String,
        /// OWNER/NAME[:VERSION] (VERSION defaults to latest)
        reference: String,
        #[command(flatten)]
        hub: HubArgs,
        /// Secret key to sign with [default: $FORKD_HOME/keys/forkd.key]
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Push without a signature (pulls then need --insecure)
        #[arg(long, conflicts_with = "key")]
        unsigned: bool,
        /// Description shown by `forkd search` [default: the manifest's]
        #[arg(long)]
        description: Option<String>,
        /// Chunks compressed and uploaded at once
        #[arg(long, short, default_value_t = 8)]
        jobs: usize,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Download OWNER/NAME[:VERSION|@sha256:DIGEST] from a hub into the local store
    Pull {
        reference: String,
        /// Local tag [default: NAME]
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        hub: HubArgs,
        /// Trust this minisign public key (a key, or a .pub file); repeatable
        #[arg(long, value_name = "KEY")]
        trust: Vec<String>,
        /// Accept an unsigned or wrongly signed image
        #[arg(long)]
        insecure: bool,
        /// Replace a local tag that came from another owner (or was made on this host)
        #[arg(long)]
        force: bool,
        /// Don't check that this host can run the snapshot
        #[arg(long)]
        skip_compat_check: bool,
        /// Concurrent downloads
        #[arg(long, short, default_value_t = 8)]
        jobs: usize,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Search a hub's catalogue
    Search {
        /// Text to look for in names and descriptions
        text: Option<String>,
        #[command(flatten)]
        hub: HubArgs,
        #[arg(long)]
        json: bool,
    },
    /// Signing keys
    #[command(subcommand)]
    Key(KeyCmd),
    /// Run a hub
    #[command(subcommand)]
    Hub(HubCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCmd {
    /// Make a minisign (ed25519) key pair for `forkd push`
    #[command(after_help = "Example:\n  forkd key generate")]
    Generate {
        /// Directory for forkd.key and forkd.pub [default: $FORKD_HOME/keys]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Trust a publisher's public key for the images of one owner
    #[command(
        long_about = "Trust a publisher's public key for the images of one OWNER: `forkd pull \
                      OWNER/NAME` then accepts images signed with it, and images of any other owner \
                      signed with it are refused. The entry is added to $FORKD_HOME/trusted-keys as \
                      `OWNER KEY`. A bare `KEY` line there (from before keys were scoped) still \
                      verifies every owner, with a warning on each pull.",
        after_help = "Examples:\n  forkd key trust acme RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\n  forkd key trust acme ./acme.pub"
    )]
    Trust {
        /// The owner (OWNER of OWNER/NAME) whose images the key may sign
        owner: String,
        /// A base64 minisign public key, or a .pub file
        key: String,
    },
    /// List the trusted keys and the owners each may sign for
    #[command(after_help = "Example:\n  forkd key list")]
    List,
}

#[derive(clap::Subcommand, Debug)]
pub enum HubCmd {
    /// Serve a hub over HTTP: anonymous reads (with Range), writes with a bearer token
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free one)
        #[arg(long)]
        listen: String,
        /// Hub directory [default: $FORKD_HOME/hub]
        #[arg(long)]
        root: Option<PathBuf>,
        /// File holding the bearer token that writes must present
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn open_hub(args: &HubArgs, store: &Store) -> Result<Arc<dyn Transport>> {
    let token = match &args.token_file {
        Some(f) => Some(forkd_hub::transport::read_token(f)?),
        None => std::env::var("FORKD_HUB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let opts = HubOptions { token };
    Ok(forkd_hub::transport::open_or_default(
        store.home(),
        args.hub.as_deref(),
        &opts,
    )?)
}

pub fn run(cmd: Cmd, ctx: &Ctx) -> Result<()> {
    match cmd {
        Cmd::Push {
            local_tag,
            reference,
            hub,
            key,
            unsigned,
            description,
            jobs,
            json,
        } => {
            let store = ctx.store()?;
            let tag = Tag::parse(&local_tag)?;
            let reference = Reference::parse(&reference)?;
            let snapshot = store.get(&tag)?;
            let key = if unsigned {
                None
            } else {
                let key = forkd_hub::sign::signing_key(store.home(), key.as_deref());
                Some(key.map_err(|e| match e {
                    SignError::NoSigningKey(_) => anyhow::Error::from(e).context(Hint(
                        "run `forkd key generate` (or pass --key FILE, or --unsigned)".into(),
                    )),
                    e => e.into(),
                })?)
            };
            let transport = open_hub(&hub, &store)?;
            let shown = transport.describe();
            let opts = forkd_hub::push::PushOptions {
                jobs,
                key,
                description,
                zstd_level: 3,
            };
            let progress = crate::commands::hub_progress::Bars::new(ctx);
            let out = runtime()?
                .block_on(forkd_hub::push::push(
                    transport, &snapshot, &reference, &opts, &progress,
                ))
                .map_err(|e| with_hint(e, &shown))
                .with_context(|| format!("cannot push `{tag}` to {shown}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "reference": reference.to_string(), "digest": out.digest, "hub": shown,
                        "stored_size": out.stored_size, "uploaded_bytes": out.uploaded_bytes,
                        "reused_bytes": out.reused_bytes, "signed": out.signed,
                    })
                );
            } else {
                println!(
                    "pushed `{tag}` as {reference} ({}) to {shown}: {} stored, {} uploaded, {} already there{}",
                    out.digest,
                    human_bytes(out.stored_size),
                    human_bytes(out.uploaded_bytes),
                    human_bytes(out.reused_bytes),
                    if out.signed { "" } else { " [unsigned]" }
                );
            }
            Ok(())
        }
        Cmd::Pull {
            reference,
            tag,
            hub,
            trust,
            insecure,
            force,
            skip_compat_check,
            jobs,
            json,
        } => {
            let store = ctx.store()?;
            let reference = Reference::parse(&reference)?;
            let tag = Tag::parse(tag.as_deref().unwrap_or(&reference.name))?;
            let trusted = trusted_keys(&store, &trust, &reference.owner)?;
            let transport = open_hub(&hub, &store)?;
            let shown = transport.describe();
            let opts = forkd_hub::pull::PullOptions {
                tag,
                jobs,
                trusted,
                insecure,
                force,
                skip_compat_check,
                attempts: std::env::var("FORKD_HUB_ATTEMPTS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(4),
            };
            let progress = crate::commands::hub_progress::Bars::new(ctx);
            let started = std::time::Instant::now();
            let out = runtime()?
                .block_on(forkd_hub::pull::pull(
                    transport, &store, &reference, &opts, &progress,
                ))
                .map_err(|e| with_hint(e, &shown))
                .with_context(|| format!("cannot pull {reference} from {shown}"))?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "reference": reference.to_string(), "digest": out.digest, "tag": out.tag.as_str(),
                        "hub": shown, "up_to_date": out.up_to_date, "downloaded_bytes": out.downloaded_bytes,
                        "cached_bytes": out.cached_bytes, "size": out.apparent_size, "verified": out.unverified.is_none(),
                        "seconds": secs,
                    })
                );
            } else if out.up_to_date {
                println!(
                    "`{}` is up to date with {reference} ({})",
                    out.tag, out.digest
                );
            } else {
                println!(
                    "pulled {reference} ({}) as `{}`: {} in {secs:.1} s ({} downloaded, {} from cache){}",
                    out.digest,
                    out.tag,
                    human_bytes(out.apparent_size),
                    human_bytes(out.downloaded_bytes),
                    human_bytes(out.cached_bytes),
                    if out.unverified.is_some() {
                        " [NOT VERIFIED]"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Cmd::Search { text, hub, json } => {
            let store = ctx.store()?;
            let transport = open_hub(&hub, &store)?;
            let shown = transport.describe();
            let catalog = runtime()?
                .block_on(forkd_hub::remote::fetch_catalog(transport.as_ref()))
                .with_context(|| format!("cannot search {shown}"))?;
            let found = forkd_hub::remote::search(&catalog, text.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
                return Ok(());
            }
            if found.is_empty() {
                println!("no images found on {shown}");
            }
            for img in found {
                println!("{}  {}", img.name, img.description);
                for v in img.versions {
                    println!(
                        "    :{:<16} {:>10} download  {:>10} on disk  {}  {}",
                        v.version,
                        human_bytes(v.size),
                        v.disk_size.map(human_bytes).unwrap_or_default(),
                        &v.digest[..19.min(v.digest.len())],
                        v.created_at
                    );
                }
            }
            Ok(())
        }
        Cmd::Key(KeyCmd::Generate { out }) => {
            let dir = match out {
                Some(d) => d,
                None => ctx.store()?.home().keys_dir(),
            };
            let (sk, pk, line) = forkd_hub::sign::generate(&dir)?;
            println!(
                "secret key: {}\npublic key: {}\n{line}",
                sk.display(),
                pk.display()
            );
            Ok(())
        }
        Cmd::Key(KeyCmd::Trust { owner, key }) => {
            let home = ctx.store()?.home().clone();
            let pk = forkd_hub::sign::parse_public_key(&key).context("bad public key")?;
            let path = home.trusted_keys();
            let added = forkd_hub::sign::trust(&path, &owner, &pk)?;
            let id = forkd_hub::sign::TrustedKey {
                key: pk,
                scope: forkd_hub::sign::Scope::Owner(owner.clone()),
            }
            .key_id();
            if added {
                println!(
                    "trusting key {id} for images of {owner} ({})",
                    path.display()
                );
            } else {
                println!("key {id} was already trusted for images of {owner}");
            }
            Ok(())
        }
        Cmd::Key(KeyCmd::List) => {
            let home = ctx.store()?.home().clone();
            let keys = forkd_hub::sign::trusted_keys(&home)?;
            if keys.is_empty() {
                println!(
                    "no trusted keys; `forkd key trust OWNER KEY` adds one ({})",
                    home.trusted_keys().display()
                );
            }
            for k in keys {
                let scope = match &k.scope {
                    forkd_hub::sign::Scope::Owner(o) => format!("owner {o}"),
                    forkd_hub::sign::Scope::Own => "any owner (this host's own key)".into(),
                    forkd_hub::sign::Scope::Legacy => {
                        "ANY OWNER (bare line; scope it with `forkd key trust OWNER KEY`)".into()
                    }
                };
                println!("{}  {}  {scope}", k.key_id(), k.key.to_base64());
            }
            Ok(())
        }
        Cmd::Hub(HubCmd::Serve {
            listen,
            root,
            token_file,
        }) => {
            let token = forkd_hub::transport::read_token(&token_file)?;
            let root = match root {
                Some(r) => r,
                None => ctx.store()?.home().hub_dir(),
            };
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                let addr = listener.local_addr()?;
                println!("serving {} on http://{addr}/", root.display());
                use std::io::Write;
                std::io::stdout().flush()?;
                forkd_hub::serve::serve(listener, root, token, forkd_hub::serve::shutdown_signal())
                    .await?;
                Ok::<_, anyhow::Error>(())
            })
        }
    }
}

/// Trusted keys: --trust (for the owner being pulled), then those of the store (trusted-keys,
/// and its own from `forkd key generate`).
fn trusted_keys(
    store: &Store,
    given: &[String],
    owner: &str,
) -> Result<Vec<forkd_hub::sign::TrustedKey>> {
    let mut keys = Vec::new();
    for k in given {
        keys.push(forkd_hub::sign::TrustedKey {
            key: forkd_hub::sign::parse_public_key(k)
                .with_context(|| "bad --trust key".to_string())?,
            scope: forkd_hub::sign::Scope::Owner(owner.to_string()),
        });
    }
    keys.extend(forkd_hub::sign::trusted_keys(store.home())?);
    Ok(keys)
}

fn with_hint(e: HubError, hub: &str) -> anyhow::Error {
    let hint = match &e {
        HubError::Signature { .. } => Some(
            "trust the publisher's key for this owner with `forkd key trust OWNER KEY` (or --trust \
             KEY for one pull); --insecure skips the check (not recommended)"
                .to_string(),
        ),
        HubError::Store(forkd_store::StoreError::OtherOwner { .. }) => Some(
            "`forkd inspect TAG` shows where the local image came from; --force replaces it, \
             --tag NEW pulls beside it"
                .to_string(),
        ),
        HubError::BadEngine { .. } => Some(
            "the publisher's snapshot is inconsistent; it cannot be forked safely. Ask them to \
             push it again"
                .to_string(),
        ),
        HubError::NotFound { .. } => Some(format!(
            "`forkd search --hub {hub}` lists what this hub has"
        )),
        HubError::Incompatible { .. } => Some("--skip-compat-check downloads it anyway".into()),
        _ => None,
    };
    let err = anyhow::Error::from(e);
    match hint {
        Some(h) => err.context(Hint(h)),
        None => err,
    }
}

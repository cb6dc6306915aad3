//! Snapshot Hub commands: push, pull, search, key generate, hub serve.

use crate::ctx::Ctx;
use crate::report::{Hint, Lines, escape_controls, human_bytes};
use anyhow::{Context, Result};
use forkd_hub::error::ChainProblem;
use forkd_hub::sign::SignError;
use forkd_hub::{HubError, HubOptions, Reference, Transport, TransportError};
use forkd_store::{ImageName, Store, Tag};
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
    #[command(after_help = "Examples:\n  \
        forkd key generate                                   # once\n  \
        forkd push tiny acme/tiny                            # to the embedded hub ($FORKD_HOME/hub)\n  \
        forkd push tiny:1 acme/tiny:1 --hub http://hub.lan:8080 --token-file ~/.hub-token\n  \
        forkd push python-numpy acme/python-numpy --hub s3://bucket/forkd\n  \
        forkd push python-numpy acme/python-numpy --level 15 # smaller downloads, slower push\n\n\
        Chunks are addressed by their compressed bytes, so images pushed at different --level\n\
        values share no chunks on the hub or in a puller's chunk store: publish a family of\n\
        images at one level.")]
    Push {
        /// Local image to push: TAG or NAME:VERSION
        #[arg(value_name = "IMAGE")]
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
        /// zstd level of the chunks (1 = fastest, 19 = smallest). 15 stores about 12% less
        /// than 3 (python-numpy) and compresses about 9x slower.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Download OWNER/NAME[:VERSION|@sha256:DIGEST] from a hub into the local store
    #[command(after_help = "Examples:\n  \
        forkd pull acme/tiny --hub http://hub.lan:8080 --trust acme.pub\n  \
        forkd pull acme/python-numpy:2 --tag numpy2          # with FORKD_HUB set\n  \
        forkd pull acme/tiny@sha256:0123...cdef --hub file:///mnt/usb/hub\n\n\
        Without --hub or FORKD_HUB, pull reads the embedded hub in $FORKD_HOME/hub, which holds \
        only what was pushed on this machine. Get a hub with `forkd hub serve` (see its help).")]
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
        /// Give up when the whole pull takes longer than this many seconds (0: no limit);
        /// what was verified stays cached and the next pull resumes
        #[arg(
            long,
            env = "FORKD_PULL_TIMEOUT",
            value_name = "SECONDS",
            default_value_t = 3600
        )]
        timeout: u64,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Search a hub's catalogue
    #[command(
        after_help = "Examples:\n  forkd search\n  forkd search numpy --hub http://hub.lan:8080\n  forkd search --json | jq -r '.[].name'"
    )]
    Search {
        /// Text to look for in names and descriptions
        text: Option<String>,
        #[command(flatten)]
        hub: HubArgs,
        #[arg(long)]
        json: bool,
    },
    /// Signing keys
    #[command(
        subcommand,
        after_help = "Examples:\n  forkd key generate\n  forkd key generate --out ./keys"
    )]
    Key(KeyCmd),
    /// Run a hub
    #[command(
        subcommand,
        after_help = "Examples:\n  forkd hub serve --listen 0.0.0.0:8080 --token-file ~/.hub-token"
    )]
    Hub(HubCmd),
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCmd {
    /// Make a minisign (ed25519) key pair for `forkd push`
    #[command(after_help = "Examples:\n  \
        forkd key generate                 # $FORKD_HOME/keys/forkd.key + forkd.pub\n  \
        forkd key generate --out ./keys\n\n\
        Give forkd.pub to those who pull: `forkd pull OWNER/NAME --trust forkd.pub`.")]
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
    #[command(after_help = "Examples:\n  forkd key list")]
    List,
}

#[derive(clap::Subcommand, Debug)]
pub enum HubCmd {
    /// Serve a hub over HTTP: anonymous reads (with Range), writes with a bearer token
    #[command(after_help = "Examples:\n  \
        head -c 32 /dev/urandom | base64 > ~/.hub-token && chmod 600 ~/.hub-token\n  \
        forkd hub serve --listen 0.0.0.0:8080 --token-file ~/.hub-token\n  \
        forkd push tiny acme/tiny --hub http://HOST:8080 --token-file ~/.hub-token   # publish\n  \
        forkd pull acme/tiny --hub http://HOST:8080 --trust forkd.pub               # elsewhere\n  \
        forkd hub serve --listen 0.0.0.0:8080 --read-only --root /srv/hub          # a public mirror")]
    Serve {
        /// Address to listen on: PORT or :PORT (127.0.0.1), HOST:PORT, [IPv6]:PORT;
        /// port 0 picks a free one
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Hub directory [default: $FORKD_HOME/hub]
        #[arg(long)]
        root: Option<PathBuf>,
        /// File holding the bearer token that writes must present
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "read_only",
            conflicts_with = "read_only"
        )]
        token_file: Option<PathBuf>,
        /// Refuse every write (a mirror); needs no token
        #[arg(long)]
        read_only: bool,
        /// Connections served at once; more wait until one closes
        #[arg(long, default_value_t = 512)]
        max_connections: usize,
        /// Seconds a client has to send a request's headers, and to start the next request
        /// on a kept-alive connection
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        header_timeout: u64,
        /// Seconds a connection may make no progress reading or writing before it is closed
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        stall_timeout: u64,
        /// Largest object one PUT may store, in MiB (tag files and the catalogue have smaller
        /// fixed caps)
        #[arg(long, value_name = "MIB", default_value_t = forkd_hub::serve::DEFAULT_MAX_UPLOAD.div_ceil(1 << 20))]
        max_upload_mib: u64,
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
            level,
            json,
        } => {
            let store = ctx.store()?;
            let reference = Reference::parse(&reference)?;
            let snapshot = store
                .find(&ImageName::parse(&local_tag)?)
                .context(Hint("`forkd images` lists the local images".into()))?;
            let tag = snapshot.tag.clone();
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
                zstd_level: level,
            };
            let progress = crate::commands::hub_progress::Bars::new(ctx);
            let out = runtime()?
                .block_on(forkd_hub::push::push(
                    transport, &store, &snapshot, &reference, &opts, &progress,
                ))
                .map_err(|e| with_hint(e, &shown, hub.hub.is_none()))
                .with_context(|| format!("cannot push `{tag}` to {shown}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "reference": reference.to_string(), "digest": out.digest, "hub": shown,
                        "stored_size": out.stored_size, "uploaded_bytes": out.uploaded_bytes,
                        "reused_bytes": out.reused_bytes, "signed": out.signed,
                        "parents": out.parents.iter().map(|p| serde_json::json!({
                            "tag": p.tag, "reference": p.reference, "digest": p.digest,
                            "pushed": p.pushed, "uploaded_bytes": p.uploaded_bytes,
                        })).collect::<Vec<_>>(),
                    })
                );
            } else {
                for p in &out.parents {
                    println!(
                        "parent `{}`: {} ({}) {}",
                        p.tag,
                        p.reference,
                        p.digest,
                        if p.pushed {
                            format!("pushed, {} uploaded", human_bytes(p.uploaded_bytes))
                        } else {
                            "already on the hub".to_string()
                        }
                    );
                }
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
            timeout,
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
                deadline: (timeout > 0).then(|| std::time::Duration::from_secs(timeout)),
                check: forkd_engine::spec::check_staged,
            };
            let progress = crate::commands::hub_progress::Bars::new(ctx);
            let started = std::time::Instant::now();
            let out = runtime()?
                .block_on(forkd_hub::pull::pull(
                    transport, &store, &reference, &opts, &progress,
                ))
                .map_err(|e| with_hint(e, &shown, hub.hub.is_none()))
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
                        "parents": out.parents.iter().map(|p| serde_json::json!({
                            "reference": p.reference, "digest": p.digest,
                            "content_digest": p.content_digest, "tag": p.tag.as_str(),
                            "downloaded_bytes": p.downloaded_bytes, "cached_bytes": p.cached_bytes,
                            "verified": p.unverified.is_none(),
                        })).collect::<Vec<_>>(),
                    })
                );
                return Ok(());
            }
            for p in &out.parents {
                println!(
                    "pulled the parent {} as `{}` ({} downloaded, {} from cache){}",
                    p.reference,
                    p.tag,
                    human_bytes(p.downloaded_bytes),
                    human_bytes(p.cached_bytes),
                    if p.unverified.is_some() {
                        " [NOT VERIFIED]"
                    } else {
                        ""
                    }
                );
            }
            if out.up_to_date {
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
            let (catalog, skipped) = runtime()?
                .block_on(forkd_hub::remote::fetch_catalog_checked(transport.as_ref()))
                .map_err(|e| with_hint(e, &shown, hub.hub.is_none()))
                .with_context(|| format!("cannot search {shown}"))?;
            for why in &skipped {
                eprintln!(
                    "warning: {shown}: catalog.json: skipped a malformed {}",
                    escape_controls(why, Lines::Escape)
                );
            }
            let found = forkd_hub::remote::search(&catalog, text.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
                return Ok(());
            }
            if found.is_empty() {
                println!("no images found on {shown}");
                if hub.hub.is_none() {
                    eprintln!("hint: {NO_HUB_HINT}");
                }
            }
            // Every string here is the hub's: shown with control characters escaped.
            let cell = |t: &str| escape_controls(t, Lines::Escape).into_owned();
            for img in found {
                println!("{}  {}", cell(&img.name), cell(&img.description));
                for v in img.versions {
                    let digest: String = v.digest.chars().take(19).collect();
                    println!(
                        "    :{:<16} {:>10} download  {:>10} on disk  {}  {}",
                        cell(&v.version),
                        human_bytes(v.size),
                        v.disk_size.map(human_bytes).unwrap_or_default(),
                        cell(&digest),
                        cell(&v.created_at)
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
            read_only,
            max_connections,
            header_timeout,
            stall_timeout,
            max_upload_mib,
        }) => {
            crate::ignore_sigpipe();
            let addr = forkd_hub::address::listen_addr(&listen).map_err(|e| {
                let hint = e.hint();
                anyhow::Error::from(e).context(Hint(hint.into()))
            })?;
            let token = match (&token_file, read_only) {
                (Some(f), false) => Some(forkd_hub::transport::read_token(f)?),
                _ => None,
            };
            let root = match root {
                Some(r) => r,
                None => ctx.store()?.home().hub_dir(),
            };
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            let limits = forkd_hub::serve::Limits {
                max_connections,
                header_timeout: std::time::Duration::from_secs(header_timeout.max(1)),
                stall_timeout: std::time::Duration::from_secs(stall_timeout.max(1)),
                max_upload: max_upload_mib.saturating_mul(1 << 20),
                ..Default::default()
            };
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                let addr = listener.local_addr()?;
                println!(
                    "serving {}{} on http://{addr}/",
                    root.display(),
                    if read_only { " read-only" } else { "" }
                );
                use std::io::Write;
                std::io::stdout().flush()?;
                let opts = forkd_hub::serve::ServeOptions {
                    root: root.clone(),
                    token,
                    limits,
                };
                forkd_hub::serve::serve(listener, opts, forkd_hub::serve::shutdown_signal())
                    .await
                    .with_context(|| format!("cannot serve {}", root.display()))?;
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

/// What to say when there is no hub: no --hub, no FORKD_HUB, so the embedded hub in
/// $FORKD_HOME/hub was used, and it has only what was pushed on this machine.
const NO_HUB_HINT: &str = "no hub is configured (no --hub, no FORKD_HUB), so this used the \
    embedded hub in $FORKD_HOME/hub, which holds only what `forkd push` put there on this \
    machine. Point --hub or FORKD_HUB at a hub: http://HOST:PORT of a `forkd hub serve` (run one \
    with `forkd hub serve --listen 0.0.0.0:8080 --token-file FILE` and `forkd push` to it), \
    https://..., s3://BUCKET/PREFIX or file:///DIR. Or make an image here: `forkd build-tiny`";

fn with_hint(e: HubError, hub: &str, default_hub: bool) -> anyhow::Error {
    let hint = match &e {
        HubError::NotFound { .. } | HubError::NotAHub { .. } if default_hub => {
            Some(NO_HUB_HINT.to_string())
        }
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
        HubError::Transport {
            source: TransportError::Tls { .. },
            ..
        } => Some(format!(
            "is the server plain http? `forkd hub serve` speaks plain http: use {}",
            hub.replacen("https://", "http://", 1)
        )),
        HubError::Transport {
            source: TransportError::TooLarge { .. },
            ..
        } => Some(
            "the hub (or something between it and you) sent far more than the layout allows; \
             it is broken or hostile"
                .into(),
        ),
        HubError::ParentNotLocal { .. } => Some(
            "install the parent here first (`forkd pull` or `forkd unpack` it), or push from the \
             host where the branch was made; `forkd images` shows each branch's parent"
                .into(),
        ),
        HubError::Chain { problem, .. } => match problem {
            ChainProblem::NoParent { .. } | ChainProblem::ParentNotOnHub { .. } => Some(
                "install the parent first (`forkd pull` or `forkd unpack` it), or ask the \
                 publisher to push the branch again: a push of a branch pushes its parents too"
                    .into(),
            ),
            ChainProblem::DigestMismatch { .. } | ChainProblem::Cycle { .. } => Some(
                "the hub's chain of parents does not hold together: it is broken or hostile. \
                 Nothing of the branch was installed"
                    .into(),
            ),
            ChainProblem::TooDeep { .. } => None,
            ChainProblem::ReplacesParent { .. } => {
                Some("pull the branch under another tag with --tag NEW".into())
            }
        },
        HubError::Deadline { .. } => Some(
            "raise --timeout (or FORKD_PULL_TIMEOUT); pulling again resumes from what was verified"
                .into(),
        ),
        _ => None,
    };
    let err = anyhow::Error::from(e);
    match hint {
        Some(h) => err.context(Hint(h)),
        None => err,
    }
}

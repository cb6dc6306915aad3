//! A new user's first minutes (issue 9): the README's first commands, the errors and hints a
//! newcomer meets, and the names commands print and take. Real binary, real tiny guests.

mod cli_common;

use cli_common::*;
use std::process::Command;
use std::time::{Duration, Instant};

// ---- the README and --help ---------------------------------------------------------------

/// The commands between `<!-- first-commands -->` and `<!-- /first-commands -->` in the
/// README, one per line (comments stripped).
fn readme_first_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- first-commands -->")
        .expect("README marks its first commands with <!-- first-commands -->");
    let end = readme[start..]
        .find("<!-- /first-commands -->")
        .map(|e| start + e)
        .expect("closing <!-- /first-commands -->");
    readme[start..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("```") && !l.starts_with("<!--"))
        .map(|l| l.trim_start_matches("$ ").to_string())
        .collect()
}

#[test]
fn the_readme_first_commands_work_verbatim_in_a_fresh_store() {
    let cmds = readme_first_commands();
    assert!(
        cmds.iter().any(|c| c.starts_with("forkd fork")),
        "the README's first commands fork: {cmds:?}"
    );
    // A fresh store; forkd first on PATH. The installer line itself
    // (scripts/quickstart.sh: apt-get, kernel download, release build) is what CI's set-up
    // already did, and the PATH line points at that release build: both are skipped here, and
    // everything else runs as written.
    let home = new_home();
    let bin = std::path::Path::new(FORKD).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    for c in &cmds {
        if c.contains("scripts/quickstart.sh") || c.starts_with("export PATH") {
            continue;
        }
        let o = Command::new("bash")
            .args(["-euo", "pipefail", "-c", c])
            .current_dir(repo())
            .env("PATH", &path)
            .env("FORKD_HOME", home.path().join("forkd"))
            .env("FORKD_ASSETS", ci_assets())
            .env("FORKD_ACCEL", "tcg")
            .env_remove("FORKD_HUB")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "README command {c:?} failed:\n{}",
            text(&o)
        );
        if c.starts_with("forkd fork") {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.contains("children alive"), "{out}");
        }
    }
    // --help's quick start is the same path (no OWNER placeholder that cannot be pulled).
    let help = String::from_utf8_lossy(&forkd(&["--help"]).stdout).into_owned();
    assert!(!help.contains("OWNER/python-numpy"), "{help}");
    assert!(help.contains("forkd build-tiny"), "{help}");
}

#[test]
fn an_upper_case_reference_is_refused_with_the_lower_case_spelling() {
    let home = new_home();
    let o = forkd_in(home.path(), &["pull", "OWNER/python-numpy"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("upper case is not allowed"), "{err}");
    assert!(
        err.contains(r#"did you mean "owner/python-numpy"?"#),
        "{err}"
    );
    // The same for a local tag.
    let o = forkd_in(home.path(), &["fork", "--tag", "Tiny"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(r#"did you mean "tiny"?"#), "{}", text(&o));
}

#[test]
fn pulling_with_no_hub_configured_says_how_to_get_one() {
    let home = new_home();
    for (args, code) in [
        (&["pull", "acme/python-numpy"][..], 1),
        (&["search"][..], 0),
    ] {
        let o = forkd_in(home.path(), args);
        assert_eq!(o.status.code(), Some(code), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("hint: no hub is configured"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("forkd hub serve") && err.contains("FORKD_HUB"),
            "{err}"
        );
    }
}

/// Every subcommand (walked from `forkd --help`, recursively), and the top level itself.
fn all_commands(prefix: &[String]) -> Vec<Vec<String>> {
    let mut args = prefix.to_vec();
    args.push("--help".into());
    let o = Command::new(FORKD).args(&args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut out = vec![prefix.to_vec()];
    let Some(at) = help.find("\nCommands:\n") else {
        return out;
    };
    for line in help[at + 11..].lines() {
        if !line.starts_with("  ") {
            break;
        }
        // A command's line is indented by two; a wrapped description by more.
        if line.as_bytes().get(2).is_none_or(|b| *b == b' ') {
            continue;
        }
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if name == "help" {
            continue;
        }
        let mut sub = prefix.to_vec();
        sub.push(name.to_string());
        out.extend(all_commands(&sub));
    }
    out
}

#[test]
fn every_command_has_examples_in_its_help() {
    let cmds = all_commands(&[]);
    assert!(
        cmds.len() >= 24,
        "walked only {} commands: {cmds:?}",
        cmds.len()
    );
    let mut missing = Vec::new();
    for c in &cmds {
        let mut args = c.clone();
        args.push("--help".into());
        let o = Command::new(FORKD).args(&args).output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        let Some(at) = help.find("Examples:\n") else {
            missing.push(c.join(" "));
            continue;
        };
        // An example is a line that runs forkd (or prepares for it).
        let example = help[at..].lines().nth(1).unwrap_or("");
        assert!(
            example.starts_with("  "),
            "forkd {}: empty Examples section",
            c.join(" ")
        );
    }
    assert!(missing.is_empty(), "no Examples in --help of: {missing:?}");
}

// ---- names: what fork prints is what the other commands take ------------------------------

#[test]
fn fork_keep_prints_the_id_that_exec_and_kill_take() {
    tiny();
    let out = ok(&["fork", "--tag", "tiny", "-n", "1", "--keep"]);
    let id = out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let host = forkd(&["exec", &id, "--", "hostname"]);
    let ps = ok(&["ps"]);
    let killed = forkd(&["kill", &id]);
    assert!(
        host.status.success(),
        "exec {id} (as fork printed it): {}",
        text(&host)
    );
    assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), id);
    assert!(ps.contains(&id), "{ps}");
    assert!(killed.status.success(), "{}", text(&killed));
}

#[test]
fn exec_of_shell_text_hints_at_sh_and_sh_runs_it() {
    tiny();
    let r = json(&ok(&[
        "fork", "--tag", "tiny", "-n", "1", "--keep", "--json",
    ]));
    let id = r["kept"][0].as_str().unwrap().to_string();
    let wrong = forkd(&["exec", &id, "--env", "X=42", "--", "echo $X"]);
    let sh = forkd(&[
        "exec",
        &id,
        "--env",
        "X=42",
        "--sh",
        "echo $X; echo $((6 * 7))",
    ]);
    let _ = forkd(&["kill", &id]);
    assert!(!wrong.status.success(), "{}", text(&wrong));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("hint:") && err.contains("--sh 'echo $X'"),
        "no hint for shell text given as argv: {err}"
    );
    assert!(sh.status.success(), "{}", text(&sh));
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "42\n42\n");
}

#[test]
fn name_colon_version_is_taken_wherever_a_tag_is() {
    tiny();
    // `forkd images` shows tiny:1 in its NAME:VERSION column...
    let list = json(&ok(&["images", "list", "--json"]));
    let tiny = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["tag"] == "tiny")
        .unwrap();
    let nv = format!(
        "{}:{}",
        tiny["name"].as_str().unwrap(),
        tiny["version"].as_str().unwrap()
    );
    assert_eq!(nv, "tiny:1");
    // ...and every command that takes an image takes it.
    let r = json(&ok(&[
        "fork", "--tag", &nv, "-n", "1", "--exec", "true", "--json",
    ]));
    assert_eq!(r["succeeded"], 1, "{r:#}");
    assert!(ok(&["inspect", &nv]).contains("name = \"tiny\""));
    let o = forkd(&["fork", "--tag", "tiny:9"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no image tiny:9") && err.contains("tiny:1"),
        "{err}"
    );
    // A new tag has no version: refused with the tag it probably meant.
    let o = forkd(&["build-tiny", "--tag", "tiny:2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(r#"did you mean "tiny"?"#), "{}", text(&o));
}

#[test]
fn rmi_of_an_image_with_running_children_is_refused() {
    tiny();
    let r = json(&ok(&[
        "fork", "--tag", "tiny", "-n", "1", "--keep", "--json",
    ]));
    let id = r["kept"][0].as_str().unwrap().to_string();
    let o = forkd(&["rmi", "tiny"]);
    let still = forkd(&["inspect", "tiny"]);
    let _ = forkd(&["kill", &id]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&id), "names the children: {err}");
    assert!(err.contains("--force"), "{err}");
    assert!(
        still.status.success(),
        "the image was removed: {}",
        text(&still)
    );
}

#[test]
fn build_tiny_on_an_existing_tag_refuses_before_booting() {
    tiny();
    let assets = tiny_assets();
    let t = Instant::now();
    let o = forkd(&[
        "build-tiny",
        "--assets",
        assets.to_str().unwrap(),
        "--mem-mib",
        "192",
    ]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(
        !err.contains("booting the parent"),
        "it booted a VM first: {err}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

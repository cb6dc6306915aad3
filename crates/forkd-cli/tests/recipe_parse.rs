//! Recipe parsing and validation: every recipe under recipes/ parses, and each bad field is
//! refused with an error naming that field.

use forkd_recipe::{LoadedRecipe, Recipe, RecipeError};

const GOOD: &str = r#"
name = "demo"
version = "1.0.0"
description = "a demo recipe"
base = "debian:bookworm"

[packages]
debian = ["python3", "python3-numpy"]
pip = ["requests==2.31.0"]
npm = ["playwright-core@1.49.1"]

[[files]]
src = "worker.js"
dest = "/opt/forkd/worker.js"
mode = 0o755

[vm]
memory_mib = 256
vcpus = 1

[warm]
kind = "python"
preload = "import numpy"

[[smoke]]
run = "1 + 1"
expect = "2"
"#;

/// GOOD with one line replaced (the replacement must change the text).
fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "fixture does not contain {from:?}");
    GOOD.replacen(from, to, 1)
}

/// Parse `text`, expect an `Invalid` error for `field` whose message contains `gist`.
fn refused(text: &str, field: &str, gist: &str) {
    match Recipe::parse(text) {
        Err(RecipeError::Invalid { field: f, message }) => {
            assert_eq!(f, field, "wrong field (message: {message})");
            assert!(message.contains(gist), "message {message:?} lacks {gist:?}");
            let shown = RecipeError::Invalid { field: f, message }.to_string();
            assert!(shown.contains(field), "{shown}");
        }
        other => panic!("expected an error for `{field}`, got {other:?}"),
    }
}

#[test]
fn good_recipe_parses_with_defaults() {
    let r = Recipe::parse(GOOD).unwrap();
    assert_eq!(r.name, "demo");
    assert_eq!(r.suite(), "bookworm");
    assert_eq!(r.mirror(), "http://deb.debian.org/debian");
    assert_eq!(r.files[0].mode, Some(0o755));
    assert_eq!(r.vm.disk_headroom_mib, 256);
    assert_eq!(r.warm.preload.as_deref(), Some("import numpy"));
}

#[test]
fn every_shipped_recipe_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.join("recipe.toml").is_file() {
            let lr = LoadedRecipe::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(lr.recipe.name, p.file_name().unwrap().to_str().unwrap());
            names.push(lr.recipe.name);
        }
    }
    let six = [
        "python-numpy",
        "nodejs",
        "playwright-browser",
        "jupyter-kernel",
        "code-interpreter",
        "agent-sandbox",
    ];
    for want in six {
        assert!(
            names.iter().any(|n| n == want),
            "recipe {want} missing: {names:?}"
        );
    }
}

#[test]
fn not_toml() {
    assert!(matches!(
        Recipe::parse("name = "),
        Err(RecipeError::Toml(_))
    ));
}

#[test]
fn unknown_field_is_refused() {
    let e = Recipe::parse(&with("vcpus = 1", "vcpus = 1\nmemroy_mib = 5")).unwrap_err();
    assert!(e.to_string().contains("memroy_mib"), "{e}");
}

#[test]
fn missing_required_section() {
    let text = GOOD.replace("[[smoke]]\nrun = \"1 + 1\"\nexpect = \"2\"\n", "");
    let e = Recipe::parse(&text).unwrap_err();
    assert!(e.to_string().contains("smoke"), "{e}");
}

#[test]
fn too_large() {
    let text = format!("{GOOD}\n#{}", "x".repeat(70 << 10));
    assert!(matches!(
        Recipe::parse(&text),
        Err(RecipeError::TooLarge(_))
    ));
}

#[test]
fn bad_name() {
    refused(
        &with("name = \"demo\"", "name = \"Demo/../x\""),
        "name",
        "a-z",
    );
}

#[test]
fn bad_version() {
    refused(
        &with("version = \"1.0.0\"", "version = \"1 0\""),
        "version",
        "use A-Z",
    );
}

#[test]
fn bad_description() {
    refused(
        &with("a demo recipe", "bell\\u0007"),
        "description",
        "control characters",
    );
}

#[test]
fn base_not_debian() {
    refused(
        &with("debian:bookworm", "alpine:3.20"),
        "base",
        "debian:SUITE",
    );
}

#[test]
fn base_unknown_suite() {
    refused(
        &with("debian:bookworm", "debian:hamm"),
        "base",
        "unknown Debian suite",
    );
}

#[test]
fn bad_mirror() {
    refused(
        &with(
            "base = \"debian:bookworm\"",
            "base = \"debian:bookworm\"\nmirror = \"ftp://x\"",
        ),
        "mirror",
        "http",
    );
}

#[test]
fn no_debian_packages() {
    refused(
        &with("debian = [\"python3\", \"python3-numpy\"]", "debian = []"),
        "packages.debian",
        "at least one",
    );
}

#[test]
fn debian_package_that_looks_like_an_option() {
    refused(
        &with("\"python3-numpy\"]", "\"--allow-unauthenticated\"]"),
        "packages.debian",
        "not a Debian package",
    );
}

#[test]
fn debian_package_with_shell_characters() {
    refused(
        &with("\"python3-numpy\"]", "\"numpy;reboot\"]"),
        "packages.debian",
        "not a Debian package",
    );
}

#[test]
fn duplicate_debian_package() {
    refused(
        &with("\"python3-numpy\"]", "\"python3\"]"),
        "packages.debian",
        "twice",
    );
}

#[test]
fn bad_pip_spec() {
    refused(
        &with("requests==2.31.0", "--index-url=http://evil"),
        "packages.pip",
        "requirement",
    );
}

#[test]
fn bad_npm_spec() {
    refused(
        &with("playwright-core@1.49.1", "git+ssh://x"),
        "packages.npm",
        "npm package spec",
    );
}

#[test]
fn file_src_escapes_recipe_dir() {
    refused(
        &with("src = \"worker.js\"", "src = \"../../etc/shadow\""),
        "files[0].src",
        "relative path",
    );
}

#[test]
fn file_dest_relative() {
    refused(
        &with("dest = \"/opt/forkd/worker.js\"", "dest = \"opt/x\""),
        "files[0].dest",
        "absolute",
    );
}

#[test]
fn file_dest_dotdot() {
    refused(
        &with(
            "dest = \"/opt/forkd/worker.js\"",
            "dest = \"/opt/../etc/passwd\"",
        ),
        "files[0].dest",
        "absolute",
    );
}

#[test]
fn file_mode_too_large() {
    refused(
        &with("mode = 0o755", "mode = 0o17777"),
        "files[0].mode",
        "0o7777",
    );
}

#[test]
fn memory_out_of_range() {
    refused(
        &with("memory_mib = 256", "memory_mib = 16"),
        "vm.memory_mib",
        "out of range",
    );
}

#[test]
fn vcpus_zero() {
    refused(&with("vcpus = 1", "vcpus = 0"), "vm.vcpus", "out of range");
}

#[test]
fn warm_kind_unknown() {
    refused(
        &with("kind = \"python\"", "kind = \"ruby\""),
        "warm.kind",
        "not a built-in",
    );
}

#[test]
fn warm_kind_and_argv() {
    refused(
        &with(
            "kind = \"python\"",
            "kind = \"python\"\nargv = [\"/bin/sh\"]",
        ),
        "warm",
        "exactly one",
    );
}

#[test]
fn warm_argv_relative_program() {
    refused(
        &with("kind = \"python\"", "argv = [\"node\", \"w.js\"]"),
        "warm.argv",
        "absolute",
    );
}

#[test]
fn smoke_run_and_exec() {
    refused(
        &with("run = \"1 + 1\"", "run = \"1 + 1\"\nexec = \"true\""),
        "smoke[0]",
        "exactly one",
    );
}

#[test]
fn smoke_expect_empty() {
    refused(
        &with("expect = \"2\"", "expect = \" \""),
        "smoke[0].expect",
        "must not be empty",
    );
}

#[test]
fn load_refuses_missing_file_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("recipe.toml"), GOOD).unwrap();
    match LoadedRecipe::load(dir.path()) {
        Err(RecipeError::Invalid { field, message }) => {
            assert_eq!(field, "files[0].src");
            assert!(message.contains("worker.js"), "{message}");
        }
        other => panic!("expected files[0].src error, got {other:?}"),
    }
    std::fs::write(dir.path().join("worker.js"), "// ok").unwrap();
    assert_eq!(LoadedRecipe::load(dir.path()).unwrap().recipe.name, "demo");
}

#[test]
fn cli_check_reports_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("recipe.toml"),
        with("vcpus = 1", "vcpus = 99"),
    )
    .unwrap();
    std::fs::write(dir.path().join("worker.js"), "// ok").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["recipe", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:") && err.contains("vm.vcpus"), "{err}");
}

//! Branching (issue 10) on real tiny guests: a running child saved as an image of its changes,
//! its grandchildren, chains, and every bad input the issue names.

mod cli_common;
use cli_common::*;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

/// Fork one kept child of `tag` in `home`; returns its id.
fn keep_one(home: &Path, tag: &str) -> String {
    let out = ok_in(home, &["fork", "--tag", tag, "-n", "1", "--keep", "--json"]);
    json(&out)["kept"][0].as_str().unwrap().to_string()
}

fn sh(home: &Path, id: &str, script: &str) -> String {
    ok_in(home, &["exec", id, "--sh", script])
}

fn branch(home: &Path, id: &str, tag: &str) -> serde_json::Value {
    json(&ok_in(
        home,
        &["snapshot", "--from", id, "--tag", tag, "--json"],
    ))
}

fn fork_exec(home: &Path, tag: &str, n: usize, script: &str) -> serde_json::Value {
    let out = ok_in(
        home,
        &[
            "fork",
            "--tag",
            tag,
            "-n",
            &n.to_string(),
            "--exec",
            script,
            "--json",
        ],
    );
    json(&out)
}

fn stdouts(report: &serde_json::Value) -> Vec<String> {
    report["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["exec"]["stdout"].as_str().unwrap_or("").to_string())
        .collect()
}

fn images(home: &Path) -> Vec<String> {
    let v = json(&ok_in(home, &["images", "--json"]));
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["tag"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_running_child_is_branched_and_its_grandchildren_see_its_state() {
    let home = new_home();
    let h = home.path();
    let _kill = KillAll(h.to_path_buf());
    build_tiny_in(h);
    let src = keep_one(h, "tiny");
    // Memory-only state (a tmpfs file) and disk state (a file on /). The warm worker's state
    // (a live process) is checked through the SDK (sdk/python/tests/test_branch.py).
    sh(
        h,
        &src,
        "dd if=/dev/urandom of=/run/blob bs=1M count=4 2>/dev/null; md5sum /run/blob > /root/blob.md5; \
         echo disk-state > /root/state.txt",
    );
    let md5 = sh(h, &src, "cat /root/blob.md5");
    let b = branch(h, &src, "tiny-b");
    assert!(b["pause_ms"].as_u64().unwrap() < 5000, "{b}");
    assert!(
        b["own_pages"].as_u64().unwrap() >= 1024,
        "4 MiB of new data: {b}"
    );
    // The source goes on running, unchanged.
    assert_eq!(sh(h, &src, "md5sum /run/blob"), md5);

    let r = fork_exec(
        h,
        "tiny-b",
        3,
        "md5sum /run/blob; cat /root/state.txt; echo mine-$(hostname) > /root/own.txt",
    );
    assert_eq!(r["succeeded"], 3, "{r}");
    for (i, out) in stdouts(&r).iter().enumerate() {
        assert!(out.starts_with(md5.trim()), "grandchild {i}: {out}");
        assert!(out.contains("disk-state"), "grandchild {i}: {out}");
    }
    // Writes in a grandchild are visible neither to its siblings nor to the source.
    let r = fork_exec(h, "tiny-b", 2, "cat /root/own.txt 2>&1 || echo none");
    for out in stdouts(&r) {
        assert!(
            out.contains("none") || out.contains("No such file"),
            "{out}"
        );
    }
    assert!(sh(h, &src, "cat /root/own.txt 2>&1 || echo none").contains("none"));

    // The branch stores what changed, not a copy: far less than its parent.
    let info = json(&ok_in(h, &["images", "--json"]));
    let size = |tag: &str| {
        info.as_array()
            .unwrap()
            .iter()
            .find(|i| i["tag"] == tag)
            .map(|i| i["disk_size"].as_u64().unwrap())
            .unwrap()
    };
    assert!(
        size("tiny-b") * 4 < size("tiny"),
        "branch {} vs parent {}",
        size("tiny-b"),
        size("tiny")
    );

    // A branch of a branch (depth 2) sees both levels; the middle image stays as it was.
    let mid = keep_one(h, "tiny-b");
    sh(h, &mid, "echo level2 > /root/level2.txt");
    branch(h, &mid, "tiny-b2");
    let r = fork_exec(h, "tiny-b2", 1, "cat /root/state.txt /root/level2.txt");
    assert_eq!(stdouts(&r)[0], "disk-state\nlevel2\n");
    let r = fork_exec(h, "tiny-b", 1, "cat /root/level2.txt 2>&1 || echo none");
    assert!(stdouts(&r)[0].contains("none"));
    ok_in(h, &["verify", "tiny-b"]);
    kill_all_in(h);
}

#[test]
fn bad_sources_are_refused_and_leave_the_store_as_it_was() {
    let home = new_home();
    let h = home.path();
    let _kill = KillAll(h.to_path_buf());
    build_tiny_in(h);
    let before = images(h);

    // Gone: no such child.
    let o = forkd_in(h, &["snapshot", "--from", "tiny-000000-9", "--tag", "x"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no running child"), "{}", text(&o));

    // Busy: a command is running in it.
    let id = keep_one(h, "tiny");
    let busy = cmd_in(h)
        .args(["exec", &id, "--sh", "sleep 4; echo slept"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let o = forkd_in(h, &["snapshot", "--from", &id, "--tag", "x"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("busy"), "{}", text(&o));
    let out = busy.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("slept"));

    // Paused: QMP `stop` on its own socket.
    qmp(&h.join("run").join(&id).join("qmp.sock"), "stop");
    let o = forkd_in(h, &["snapshot", "--from", &id, "--tag", "x"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("paused"), "{}", text(&o));
    qmp(&h.join("run").join(&id).join("qmp.sock"), "cont");

    // A tag that exists is refused before the child is touched.
    let o = forkd_in(h, &["snapshot", "--from", &id, "--tag", "tiny"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already exists"), "{}", text(&o));

    // Gone: its QEMU was killed.
    let pid = json(&ok_in(h, &["ps", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .map(|c| c["pid"].as_u64().unwrap())
        .unwrap();
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(300));
    let o = forkd_in(h, &["snapshot", "--from", &id, "--tag", "x"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("stopped") || text(&o).contains("no running child"),
        "{}",
        text(&o)
    );
    assert_eq!(images(h), before, "a refused snapshot changed the store");
    let leftovers: Vec<_> = std::fs::read_dir(h.join("tmp"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    kill_all_in(h);
}

/// One QMP command on `sock`.
fn qmp(sock: &Path, cmd: &str) {
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    for c in ["qmp_capabilities", cmd] {
        writeln!(w, "{{\"execute\":\"{c}\"}}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "{c}: {line}");
        }
    }
}

#[test]
fn chains_are_checked_before_any_child_starts() {
    let home = new_home();
    let h = home.path();
    let _kill = KillAll(h.to_path_buf());
    build_tiny_in(h);
    let id = keep_one(h, "tiny");
    sh(h, &id, "echo x > /root/x");
    branch(h, &id, "tiny-b");
    kill_all_in(h);

    // rmi of a parent is refused and says what --force breaks; the branch still forks.
    let o = forkd_in(h, &["rmi", "tiny"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("tiny-b"), "{}", text(&o));
    assert!(images(h).contains(&"tiny".to_string()));

    // A parent missing locally: only the branch in a fresh store.
    let other = new_home();
    let o2 = other.path();
    ok_in(o2, &["images"]);
    copy_dir(&h.join("images/tiny-b"), &o2.join("images/tiny-b"));
    let o = forkd_in(o2, &["fork", "--tag", "tiny-b", "-n", "1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("needs its parent tiny:1"), "{}", text(&o));

    // A cycle in hostile manifests: cyc-a names cyc-b as its parent (consistently, in its
    // manifest and engine.json), and cyc-b's manifest names cyc-a.
    for t in ["cyc-a", "cyc-b"] {
        copy_dir(&h.join("images/tiny-b"), &h.join("images").join(t));
    }
    std::fs::write(h.join("images/cyc-b/vmstate"), b"QEVM\0\0\0\x03other").unwrap();
    let mut b = manifest(h, "cyc-b");
    refresh_entry(&mut b, h, "cyc-b", "vmstate");
    write_manifest(h, "cyc-b", b.clone(), &b.parent_digest.clone().unwrap());
    let db = manifest(h, "cyc-b").digest();
    set_engine_parent(h, "cyc-a", &db);
    let da = manifest(h, "cyc-a").digest();
    write_manifest(h, "cyc-b", manifest(h, "cyc-b"), &da);
    let o = forkd_in(h, &["fork", "--tag", "cyc-a", "-n", "1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cycle"), "{}", text(&o));

    // A branch whose engine.json names another parent than its manifest.
    copy_dir(&h.join("images/tiny-b"), &h.join("images/mism"));
    let real = manifest(h, "mism").parent_digest.unwrap();
    set_engine_parent(h, "mism", &format!("sha256:{}", "0".repeat(64)));
    write_manifest(h, "mism", manifest(h, "mism"), &real);
    let o = forkd_in(h, &["fork", "--tag", "mism", "-n", "1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("its parent is"), "{}", text(&o));

    // After all that, the real branch still forks.
    let r = fork_exec(h, "tiny-b", 1, "cat /root/x");
    assert_eq!(stdouts(&r)[0], "x\n");
}

/// Recompute the size and sha256 of `file` in manifest `m` of image `tag`.
fn refresh_entry(m: &mut forkd_store::Manifest, home: &Path, tag: &str, file: &str) {
    let data = std::fs::read(home.join("images").join(tag).join(file)).unwrap();
    let e = m.files.get_mut(file).unwrap();
    e.size = data.len() as u64;
    e.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
}

/// Point image `tag` at `parent` in both its engine.json and its manifest.
fn set_engine_parent(home: &Path, tag: &str, parent: &str) {
    let p = home.join("images").join(tag).join("engine.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["parent"]["digest"] = parent.into();
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let mut m = manifest(home, tag);
    refresh_entry(&mut m, home, tag, "engine.json");
    write_manifest(home, tag, m, parent);
}

fn manifest(home: &Path, tag: &str) -> forkd_store::Manifest {
    let t = std::fs::read_to_string(home.join("images").join(tag).join("manifest.toml")).unwrap();
    forkd_store::Manifest::parse(&t).unwrap()
}

fn write_manifest(home: &Path, tag: &str, mut m: forkd_store::Manifest, parent: &str) {
    m.name = tag.into();
    m.parent_digest = Some(parent.into());
    std::fs::write(
        home.join("images").join(tag).join("manifest.toml"),
        m.to_toml().unwrap(),
    )
    .unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_disk_full_mid_snapshot_leaves_no_half_image_and_the_child_runs_on() {
    let home = new_home();
    let h = home.path();
    let _kill = KillAll(h.to_path_buf());
    build_tiny_in(h);
    let id = keep_one(h, "tiny");
    sh(
        h,
        &id,
        "dd if=/dev/urandom of=/run/blob bs=1M count=8 2>/dev/null; echo ok",
    );
    let before = images(h);
    // The store's staging area (tmp/) on a 2 MiB file system: the 8 MiB of changes do not fit.
    let tmp = h.join("tmp");
    let o = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "forkd-test-full"])
        .arg(&tmp)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cannot mount a tmpfs (the test needs root): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = forkd_in(h, &["snapshot", "--from", &id, "--tag", "full"]);
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
        .map(|e| e.file_name())
        .collect();
    let _ = std::process::Command::new("umount").arg(&tmp).status();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("No space left") || text(&out).contains("space"),
        "{}",
        text(&out)
    );
    assert!(leftovers.is_empty(), "half image left: {leftovers:?}");
    assert_eq!(images(h), before);
    // The source was resumed and still answers.
    assert!(sh(h, &id, "echo alive").contains("alive"));
    kill_all_in(h);
}

#[test]
fn a_chain_is_pushed_and_pulled_into_a_fresh_store_and_forked_there() {
    let publisher = new_home();
    let p = publisher.path();
    let _kill = KillAll(p.to_path_buf());
    build_tiny_in(p);
    ok_in(p, &["-q", "key", "generate"]);
    let id = keep_one(p, "tiny");
    sh(
        p,
        &id,
        "echo level1 > /root/l1.txt; dd if=/dev/urandom of=/run/r bs=1M count=2 2>/dev/null; \
         md5sum /run/r > /root/r.md5",
    );
    branch(p, &id, "tiny-b1");
    kill_all_in(p);
    let id = keep_one(p, "tiny-b1");
    sh(p, &id, "echo level2 > /root/l2.txt");
    branch(p, &id, "tiny-b2");
    kill_all_in(p);

    let hub = new_home();
    let url = format!("file://{}", hub.path().display());
    ok_in(
        p,
        &["-q", "push", "tiny-b2", "acme/tiny-b2:1", "--hub", &url],
    );

    let user = new_home();
    let u = user.path();
    let _kill_u = KillAll(u.to_path_buf());
    let key = p.join("keys/forkd.pub");
    ok_in(
        u,
        &[
            "pull",
            "acme/tiny-b2:1",
            "--hub",
            &url,
            "--trust",
            key.to_str().unwrap(),
        ],
    );
    let got = images(u);
    assert!(
        got.len() >= 3,
        "the parents did not come with the branch: {got:?}"
    );
    assert!(got.contains(&"tiny-b2".to_string()), "{got:?}");
    let r = fork_exec(
        u,
        "tiny-b2",
        2,
        "cat /root/l1.txt /root/l2.txt; md5sum -c /root/r.md5",
    );
    for out in stdouts(&r) {
        assert_eq!(out, "level1\nlevel2\n/run/r: OK\n");
    }
    for t in &got {
        ok_in(u, &["verify", t]);
    }
}

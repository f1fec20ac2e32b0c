//! The deployment manifests as an operator meets them: every Kubernetes
//! overlay renders with `kubectl kustomize`, validates against the
//! Kubernetes schemas (`kubernetes-validate`) and passes `checkov` (each
//! skipped check carries its reason in the manifest); every command line in
//! the manifests, units and compose file is one the binary accepts.
//!
//! The tools come from `scripts/test.sh` (kubectl from Debian's
//! `kubernetes-client` when missing, the Python ones into `.venv` from
//! tests/ops/requirements.txt). Without them the tests fail when
//! `SWITCHYARD_REQUIRE_OPS=1` (as in CI) and are skipped loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use switchyard_testkit::gateway::temp_dir;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// A tool from `.venv/bin` or the PATH; `None` (after failing or saying
/// so) when it is not installed.
fn tool(name: &str) -> Option<PathBuf> {
    let venv = root().join(".venv/bin").join(name);
    if venv.exists() {
        return Some(venv);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    });
    if on_path.is_none() {
        if std::env::var("SWITCHYARD_REQUIRE_OPS").as_deref() == Ok("1") {
            panic!("{name} is not installed: run scripts/test.sh");
        }
        eprintln!("SKIPPED: {name} is not installed (scripts/test.sh installs it)");
    }
    on_path
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn overlays() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s/overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_overlay_renders_validates_and_passes_checkov() {
    let overlays = overlays();
    let names: Vec<String> = overlays
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"eu-west".to_string()) && names.contains(&"us-east".to_string()),
        "{names:?}"
    );
    let (Some(kubectl), Some(validate), Some(checkov)) = (
        tool("kubectl"),
        tool("kubernetes-validate"),
        tool("checkov"),
    ) else {
        return;
    };
    let dir = temp_dir("ops-k8s");
    for (overlay, region) in overlays.iter().zip(&names) {
        let (ok, rendered) = run(Command::new(&kubectl).arg("kustomize").arg(overlay));
        assert!(ok, "{region}: kubectl kustomize failed: {rendered}");
        let out = dir.join(format!("{region}.yaml"));
        // Deprecation warnings of newer kustomize versions go to stderr;
        // render stdout alone.
        let stdout = Command::new(&kubectl)
            .arg("kustomize")
            .arg(overlay)
            .output()
            .unwrap()
            .stdout;
        std::fs::write(&out, &stdout).unwrap();
        let text = String::from_utf8(stdout).unwrap();

        // What the region must get, as rendered.
        for needle in [
            "kind: Namespace",
            "name: switchyard-edge",
            "name: switchyard-egress",
            "name: switchyard-control-plane",
            "kind: PodDisruptionBudget",
            "kind: NetworkPolicy",
            "type: LoadBalancer",
            "clusterIP: None",
            "readOnlyRootFilesystem: true",
            "runAsNonRoot: true",
            "path: /readyz",
            "path: /healthz",
            "prometheus.io/scrape",
            "--shutdown-grace-seconds=300",
        ] {
            assert!(text.contains(needle), "{region}: no {needle:?} in {text}");
        }
        assert!(
            text.contains(&format!("{region}.api.example.com")),
            "{region}: no regional hostname"
        );
        assert!(
            text.contains(&format!("region={region}"))
                || text.contains(&format!("region: {region}")),
            "{region}: the region is not set"
        );
        assert_eq!(
            text.matches("kind: PodDisruptionBudget").count(),
            3,
            "{region}: one PDB per role"
        );

        let (ok, report) = run(Command::new(&validate).arg("--strict").arg(&out));
        assert!(ok, "{region}: kubernetes-validate: {report}");

        let (ok, report) = run(Command::new(&checkov)
            .args([
                "--framework",
                "kubernetes",
                "--compact",
                "--quiet",
                "--skip-download",
                "-f",
            ])
            .arg(&out));
        assert!(ok, "{region}: checkov findings:\n{report}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `switchyard ARGS... --help`: clap rejects an unknown flag or a bad
/// value before it reaches `--help`, so success means every flag exists.
fn accepts(args: &[String]) -> (bool, String) {
    run(Command::new(binary()).args(args).arg("--help"))
}

/// Values the manifests leave to their environment, made concrete.
fn concrete(arg: &str) -> String {
    arg.replace("$(SWITCHYARD_REGION)", "eu-west")
        .replace("$(POD_NAME)", "pod-0")
        .replace("$(SWITCHYARD_STORE_URL)", "sqlite:///tmp/x.db")
        .replace("${REGION}", "eu-west")
}

/// The `args:` lists of the Kubernetes base manifests.
fn k8s_command_lines() -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for file in ["control-plane.yaml", "edge.yaml", "egress.yaml"] {
        let text = std::fs::read_to_string(root().join("deploy/k8s/base").join(file)).unwrap();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.trim() != "args:" {
                continue;
            }
            let args: Vec<String> = lines
                .by_ref()
                .map(str::trim)
                .take_while(|l| l.starts_with("- ") || l.starts_with('#'))
                .filter_map(|l| l.strip_prefix("- "))
                .map(concrete)
                .collect();
            out.push((file.to_string(), args));
        }
    }
    out
}

/// `ExecStart=` of every systemd unit, continuation lines joined.
fn systemd_command_lines() -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\\\n", " ")
            .replace("%i", "a");
        for line in text.lines() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                let words: Vec<String> = cmd.split_whitespace().skip(1).map(concrete).collect();
                // The edge's upgrade word is empty, or --upgrade when
                // switchyard-edge-upgrade starts the instance: both must hold.
                let upgrade = "$SWITCHYARD_EDGE_UPGRADE".to_string();
                if words.contains(&upgrade) {
                    for with in [None, Some("--upgrade")] {
                        let variant = words
                            .iter()
                            .filter_map(|w| {
                                if *w == upgrade {
                                    with.map(str::to_string)
                                } else {
                                    Some(w.clone())
                                }
                            })
                            .collect();
                        out.push((path.display().to_string(), variant));
                    }
                    continue;
                }
                out.push((path.display().to_string(), words));
            }
        }
    }
    out
}

/// The `command:` lists of compose.yaml (one flow sequence per service).
fn compose_command_lines() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "command:" {
            continue;
        }
        let args: Vec<String> = lines
            .by_ref()
            .map(str::trim)
            .take_while(|l| l.starts_with("- "))
            .filter_map(|l| l.strip_prefix("- "))
            .map(|a| concrete(a.trim_matches('"')))
            .collect();
        // Shell jobs (certificates, policy) run other commands; the
        // services that matter start a role.
        if args
            .first()
            .is_some_and(|a| ["edge", "egress", "control-plane"].contains(&a.as_str()))
        {
            out.push(("deploy/compose.yaml".to_string(), args));
        }
    }
    out
}

#[test]
fn every_command_line_in_the_manifests_is_accepted_by_the_binary() {
    let lines: Vec<_> = k8s_command_lines()
        .into_iter()
        .chain(systemd_command_lines())
        .chain(compose_command_lines())
        .collect();
    // Three Kubernetes roles, three units (the edge's twice: with and
    // without --upgrade), five compose services.
    assert!(lines.len() >= 12, "{lines:?}");
    for (file, args) in lines {
        assert!(!args.is_empty(), "{file}: empty command line");
        let (ok, out) = accepts(&args);
        assert!(
            ok,
            "{file}: `switchyard {}` is refused: {out}",
            args.join(" ")
        );
    }
    // And the check itself refuses a flag that does not exist.
    assert!(!accepts(&["edge".into(), "--no-such-flag".into()]).0);
}

/// `systemd-analyze verify` on every unit (with the test binary in place of
/// /usr/local/bin/switchyard): it exits 0 even on a bad directive, so any
/// output is a finding. Optional: systemd is not installed on purpose.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("systemd-analyze"))
            .find(|p| p.exists())
    });
    let Some(analyze) = found else {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    let dir = temp_dir("ops-systemd");
    let mut units = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/switchyard", &binary().display().to_string());
        // A template is verified as one of its instances.
        let name = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace("@.service", "@a.service");
        let copy = dir.join(name);
        std::fs::write(&copy, text).unwrap();
        units.push(copy);
    }
    assert_eq!(units.len(), 3);
    let (ok, out) = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(&units));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The systemd binary upgrade for edges: the script is valid bash and
/// drives the template's two instances through the variable the unit's
/// `ExecStart` expands (an empty one binds, `--upgrade` takes sockets
/// over; both command lines are checked above).
#[test]
fn the_systemd_edge_upgrade_script_matches_its_unit() {
    let dir = root().join("deploy/systemd");
    let script = dir.join("switchyard-edge-upgrade");
    let (ok, out) = run(Command::new("bash").arg("-n").arg(&script));
    assert!(ok, "bash -n: {out}");
    let script = std::fs::read_to_string(&script).unwrap();
    let unit = std::fs::read_to_string(dir.join("switchyard-edge@.service")).unwrap();
    for needle in [
        "SWITCHYARD_EDGE_UPGRADE",
        "/run/switchyard/edge-%i.upgrade",
        "--upgrade-socket",
    ] {
        assert!(unit.contains(needle), "the unit lacks {needle}");
    }
    assert!(script.contains("SWITCHYARD_EDGE_UPGRADE=--upgrade"));
    assert!(script.contains("/run/switchyard/edge-$new.upgrade"));
    assert!(script.contains("--signal=QUIT"));
    // The log line the script waits for is the one the edge writes.
    let edge_node = std::fs::read_to_string(root().join("edge/src/node.rs")).unwrap();
    assert!(edge_node.contains("took over the listening sockets"));
    assert!(script.contains("took over the listening sockets"));
}

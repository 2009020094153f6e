//! Full backup and restore with `deploy/etcd-backup.sh` (etcd's snapshot): a cluster whose
//! etcd lost its data comes back, from the snapshot, with the agents, their secrets, the
//! tokens and the deny list as they were when it was taken, and nothing made after.

use berth_tests::{output_text as text, unique_name, ControlPlane, Etcd};
use std::path::Path;
use std::process::{Command, Output};

fn script(args: &[&str]) -> Output {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd-backup.sh"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_snapshot_restores_the_whole_cluster_state() {
    let mut etcd = Etcd::start().await.unwrap();
    let mut cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let (kept, later) = (unique_name("kept"), unique_name("later"));
    let out = cp.cli(&[
        "deploy",
        "-n",
        &kept,
        "-i",
        "example/echo:1",
        "--secret-env",
        "API_KEY=s3cret-value",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let read_only = cp.create_token(&["--scope", "read-only"]);
    assert!(cp
        .cli(&["deny", "lost-node", "--reason", "stolen"])
        .status
        .success());

    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("berth.snapshot");
    let snapshot_arg = snapshot.to_str().unwrap();
    let out = script(&["save", snapshot_arg, "--endpoints", &etcd.url()]);
    assert!(out.status.success(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&snapshot).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the snapshot holds secrets: {mode:o}");
    // Made after the snapshot: gone after the restore.
    assert!(cp
        .cli(&["deploy", "-n", &later, "-i", "example/echo:1"])
        .status
        .success());

    // etcd loses its data; it is restored from the snapshot onto the same addresses.
    cp.kill();
    etcd.stop();
    std::fs::remove_dir_all(etcd.data_dir()).unwrap();
    let data_dir = etcd.data_dir();
    let initial_cluster = format!("test={}", etcd.peer_url());
    let out = script(&[
        "restore",
        snapshot_arg,
        data_dir.to_str().unwrap(),
        "--name",
        "test",
        "--initial-cluster",
        &initial_cluster,
        "--initial-advertise-peer-urls",
        &etcd.peer_url(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = script(&["restore", snapshot_arg, data_dir.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "an existing directory is never overwritten"
    );
    etcd.resume().await.unwrap();
    cp.resume().await.unwrap();

    let listed = String::from_utf8_lossy(&cp.cli(&["ls"]).stdout).into_owned();
    assert!(
        listed.contains(&kept) && !listed.contains(&later),
        "{listed}"
    );
    let out = cp.cli(&["export", "--include-secrets"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("API_KEY: s3cret-value"),
        "{}",
        text(&out)
    );
    let out = cp
        .cli_command(&["get", &kept])
        .env("BERTH_TOKEN", &read_only)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the issued token still works: {}",
        text(&out)
    );
    let denied = String::from_utf8_lossy(&cp.cli(&["nodes", "--denied"]).stdout).into_owned();
    assert!(
        denied.contains("lost-node") && denied.contains("stolen"),
        "{denied}"
    );
}

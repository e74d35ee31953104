//! `s3://` artifacts end to end: the real `deploy-agent` binary against a
//! real S3-compatible server (testkit's s3s + s3s-fs, signatures checked,
//! a wrong secret refused) and an IMDSv2 server: ranged parallel download,
//! a 403 named in status, SlowDown backed off, instance-role keys rotated
//! in the middle of a download, a SIGKILL mid-download resumed, a delta
//! from the store, `release publish --upload` (also failing part-way), and
//! no secret in any log, status or command output.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use deploy_agent::manifest::Format;
use deploy_agent_tests::agent_bin;
use deploy_agent_tests::process::{status_json, wait_served};
use deploy_agent_tests::{wait_until_async, DEADLINE};
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::imds::ImdsServer;
use testkit::testserver::s3::{KeyRing, S3Server};

const BUCKET: &str = "builds";
const KEY_ID: &str = "AKIATESTSTATIC000001";
const SECRET: &str = "static-secret-Zq8w3n5v7b9m1k2j4h6g";

/// One host's directory, its store and its agent process.
struct Host {
    dir: tempfile::TempDir,
    s3: S3Server,
    imds: Option<ImdsServer>,
    env: Vec<(String, String)>,
    agent: Option<Child>,
}

impl Host {
    /// A store with the bucket and the static key; no agent yet.
    async fn new() -> Host {
        let dir = deploy_agent_tests::fast_tempdir();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let keys = Arc::new(KeyRing::default());
        keys.add(KEY_ID, SECRET);
        let s3 = S3Server::start(&dir.path().join("store"), keys)
            .await
            .unwrap();
        s3.create_bucket(BUCKET).unwrap();
        Host {
            dir,
            s3,
            imds: None,
            env: Vec::new(),
            agent: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the config: a local manifest file as the source, the store
    /// at the test server (path-style, as self-hosted stores are), and
    /// `store_extra` (e.g. a key file). Everything else is the default.
    fn configure(&self, store_extra: &str, extra_tables: &str) -> PathBuf {
        let config = self.path("config.toml");
        let text = format!(
            "deploy-root = \"{root}\"\n[status]\nsocket = \"{sock}\"\n[source]\nfile = \"{manifest}\"\n\
             [store]\nendpoint = \"{endpoint}\"\npath-style = true\nregion = \"eu-west-1\"\n{store_extra}\n{extra_tables}\n",
            root = self.path("root").display(),
            sock = self.path("agent.sock").display(),
            manifest = self.path("manifest.json").display(),
            endpoint = self.s3.endpoint(),
        );
        std::fs::write(&config, text).unwrap();
        config
    }

    /// A key file holding `secret` for the static key, mode 0600.
    fn key_file(&self, secret: &str) -> String {
        let path = self.path("s3.key");
        std::fs::write(
            &path,
            format!("[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {secret}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!("credentials-file = \"{}\"", path.display())
    }

    /// Keys from the IMDSv2 test server (lifetime as IMDS says).
    async fn instance_role(&mut self, lifetime: Duration) {
        let imds = ImdsServer::start(Arc::clone(self.s3.keys()), lifetime)
            .await
            .unwrap();
        self.env
            .push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), imds.endpoint()));
        self.imds = Some(imds);
    }

    /// A command of the real binary with this host's environment and no
    /// AWS settings of the machine running the tests.
    fn command(&self) -> Command {
        let mut cmd = Command::new(agent_bin());
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", self.dir.path())
            .env("DEPLOY_AGENT_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn check_config(&self, config: &std::path::Path) -> Output {
        let mut cmd = self.command();
        cmd.arg("check-config").arg("--config").arg(config);
        cmd.output().unwrap()
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("agent.log"))
            .unwrap();
        let child = self
            .command()
            .args(["--log-format", "text", "run", "--config"])
            .arg(self.path("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.agent.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            c.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Generates build `id` and stores it at `s3://builds/app/<id>.tar.gz`.
    fn build(&self, id: &str, profile: BuildProfile) -> (PathBuf, Artifact, String) {
        let path = self.path(&format!("{id}.tar.gz"));
        let a = buildgen::write_build_changing(profile, 7, id, Format::TarGz, &path, 0.01).unwrap();
        let key = format!("app/{id}.tar.gz");
        self.s3
            .put(BUCKET, &key, &std::fs::read(&path).unwrap())
            .unwrap();
        (path, a, format!("s3://{BUCKET}/{key}"))
    }

    fn publish(&self, manifest: &str) {
        let tmp = self.path("manifest.json.tmp");
        std::fs::write(&tmp, manifest).unwrap();
        std::fs::rename(tmp, self.path("manifest.json")).unwrap();
    }

    async fn wait_served(&self, id: &str) {
        wait_served(&self.path("root"), id, DEADLINE, &self.path("agent.log")).await;
    }

    /// Polls `found` until it gives a value; fails with `what` and the
    /// agent's log after [`DEADLINE`].
    async fn wait_for<T>(&self, what: &str, mut found: impl FnMut() -> Option<T>) -> T {
        wait_until_async(what, DEADLINE, || {
            std::future::ready(found().ok_or_else(|| format!("log:\n{}", self.log())))
        })
        .await
    }

    /// Waits for a status error containing every needle; returns it.
    async fn wait_error(&self, needles: &[&str]) -> String {
        let what = format!("no status error with {needles:?}");
        self.wait_for(&what, || {
            status_json(&self.path("agent.sock"))
                .and_then(|s| s["last_error"]["message"].as_str().map(str::to_string))
                .filter(|m| needles.iter().all(|n| m.contains(n)))
        })
        .await
    }

    /// Everything the agent printed or shows: its log and status.
    fn outputs(&self) -> String {
        let status = status_json(&self.path("agent.sock")).map(|s| s.to_string());
        format!("{}\n{}", self.log(), status.unwrap_or_default())
    }

    async fn wait_sent(&self, bytes: u64) {
        let what = format!("the store never sent {bytes} bytes");
        self.wait_for(&what, || {
            (self.s3.stats().bytes_sent >= bytes).then_some(())
        })
        .await;
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn assert_no_secret(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "a secret ({s}) was printed:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_parallel_download_from_the_store() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    h.configure(&key, "");
    let (_, a, url) = h.build("b1", BuildProfile::DEMO);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_served("b1").await;
    let stats = h.s3.stats();
    // 4 parallel ranges over 8 chunks: every chunk is its own ranged GET.
    assert!(stats.range_gets >= 8, "{stats:?}");
    assert_eq!(stats.bytes_sent, a.size, "{stats:?}");
    assert!(h.path("root/.deploy/cache").join(&a.sha256).exists());
    assert_no_secret(&h.outputs(), &[SECRET]);
}

/// `[download] bandwidth-limit` holds for the store as for HTTP: the same
/// engine paces the signed ranged GETs. Only a lower bound on the time
/// (a loaded machine makes it slower, never faster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds_for_the_store_too() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    let (_, a, url) = h.build("b1", BuildProfile::DEMO);
    // Two seconds' worth at the limit.
    let limit = a.size / 2;
    h.configure(&key, &format!("[download]\nbandwidth-limit = {limit}\n"));
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    let started = std::time::Instant::now();
    h.start();
    h.wait_served("b1").await;
    let took = started.elapsed().as_secs_f64();
    assert!(
        took >= 1.2,
        "{} bytes at {limit} B/s took {took:.2} s",
        a.size
    );
    let stats = h.s3.stats();
    assert!(stats.range_gets >= 2, "{stats:?}");
    assert_eq!(stats.bytes_sent, a.size, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_a_403_named_in_status_and_a_fixed_key_file_heals_without_restart() {
    let mut h = Host::new().await;
    let wrong = "wrong-secret-Lk3j5h7g9f1d2s4a";
    let key = h.key_file(wrong);
    h.configure(&key, "");
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    let e = h
        .wait_error(&[
            "s3://builds/app/b1.tar.gz",
            "403",
            "SignatureDoesNotMatch",
            KEY_ID,
            "s3:GetObject",
        ])
        .await;
    assert!(e.contains("the key file"), "{e}");
    assert!(!h.path("root/current").exists());
    // The SRE fixes the secret in the key file; no restart, no SIGHUP. The
    // next retry reads the file again (it kept the first keys for ever
    // before: found by hand, the agent failed until restarted).
    h.key_file(SECRET);
    h.wait_served("b1").await;
    assert_no_secret(&h.outputs(), &[wrong, SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_object_is_a_404_named_in_status() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    h.configure(&key, "");
    let (_, a, _) = h.build("b1", BuildProfile::TINY);
    let url = format!("s3://{BUCKET}/app/not-uploaded.tar.gz");
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_error(&[&url, "no such key", "release publish --upload"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_is_backed_off_and_retried() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    h.configure(&key, "");
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.s3.slow_down(3);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_served("b1").await;
    assert_eq!(h.s3.stats().slow_downs, 3);
    assert!(h.log().contains("SlowDown"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_role_keys_rotated_mid_download_are_fetched_again() {
    let mut h = Host::new().await;
    h.instance_role(Duration::from_secs(3600)).await;
    h.configure("", "");
    let (_, a, url) = h.build("b1", BuildProfile::DEMO);
    // Every GET body stops after 256 KiB and trickles, so the download
    // is many requests long and is still running when the keys rotate.
    h.s3.truncate(256 << 10, u64::MAX);
    h.s3.trickle(1 << 20);
    let first = h.imds.as_ref().unwrap().current();
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_sent(a.size / 4).await;
    let second = h.imds.as_ref().unwrap().rotate();
    h.wait_served("b1").await;
    let stats = h.s3.stats();
    let imds = h.imds.as_ref().unwrap();
    assert!(imds.token_puts() >= 1, "IMDSv2 token PUT never made");
    assert!(imds.credential_gets() >= 2, "keys never fetched again");
    assert!(
        stats.by_key.get(&first.access_key_id).copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    assert!(
        stats
            .by_key
            .get(&second.access_key_id)
            .copied()
            .unwrap_or(0)
            > 0,
        "{stats:?}"
    );
    assert!(
        h.log().contains("rejected these credentials") && h.log().contains("ExpiredToken"),
        "{}",
        h.log()
    );
    let secrets = [&first.secret, &first.token, &second.secret, &second.token];
    assert_no_secret(&h.outputs(), &secrets.map(String::as_str));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_token_put_names_the_hop_limit() {
    let mut h = Host::new().await;
    h.instance_role(Duration::from_secs(3600)).await;
    h.imds.as_ref().unwrap().set_hop_limited(true);
    h.configure("", "");
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_error(&["IMDSv2", "hop limit", "http-put-response-hop-limit 2"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_download_resumes_from_the_partial() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    h.configure(&key, "");
    // Big enough that the partial's sidecar (written every 4 MiB) has
    // recorded progress well before the end.
    let (_, a, url) = h.build("b1", BuildProfile::SMALL);
    h.s3.trickle(256 << 10);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_sent(6 << 20).await;
    h.kill();
    let partial = h
        .path("root/.deploy/cache")
        .join(format!("{}.partial", a.sha256));
    assert!(partial.exists(), "no partial after SIGKILL");
    let before = h.s3.stats().bytes_sent;
    h.s3.trickle(0);
    h.start();
    h.wait_served("b1").await;
    let again = h.s3.stats().bytes_sent - before;
    assert!(h.log().contains("resuming partial download"), "{}", h.log());
    // Resumed, not started over: the second run fetched less than all.
    assert!(again < a.size, "fetched {again} of {} again", a.size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_comes_from_the_store_too() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    h.configure(&key, "");
    let (p1, a1, url1) = h.build("b1", BuildProfile::DEMO);
    h.publish(&buildgen::manifest_json("b1", &url1, &a1, Format::TarGz));
    h.start();
    h.wait_served("b1").await;
    let (p2, a2, url2) = h.build("b2", BuildProfile::DEMO);
    let out = h.path("b2-from-b1.delta.tar.zst");
    let delta_url = format!("s3://{BUCKET}/app/b2-from-b1.delta.tar.zst");
    let (d, _) = deploy_agent::fleet::commander::release::delta_spec(
        (&p1, Format::TarGz),
        (&p2, Format::TarGz),
        &out,
        &delta_url,
    )
    .unwrap();
    h.s3.put(
        BUCKET,
        "app/b2-from-b1.delta.tar.zst",
        &std::fs::read(&out).unwrap(),
    )
    .unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&buildgen::manifest_json("b2", &url2, &a2, Format::TarGz)).unwrap();
    m["delta"] = serde_json::Value::Object(d.to_json());
    h.publish(&m.to_string());
    h.wait_served("b2").await;
    let gets = h.s3.stats().gets_by_path;
    assert!(
        gets.contains_key("/builds/app/b2-from-b1.delta.tar.zst"),
        "{gets:?}"
    );
    assert!(
        !gets.contains_key("/builds/app/b2.tar.gz"),
        "full artifact fetched: {gets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_the_credential_source_and_refuses_a_readable_key_file() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    let config = h.configure(&key, "");
    let out = h.check_config(&config);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("credentials from the key file"), "{text}");
    assert!(text.contains("path style"), "{text}");
    assert_no_secret(&text, &[SECRET]);
    std::fs::set_permissions(h.path("s3.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = h.check_config(&config);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    // Without a key file the environment's keys are the source.
    h.configure("", "");
    h.env.push(("AWS_ACCESS_KEY_ID".into(), KEY_ID.into()));
    h.env.push(("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()));
    let out = h.check_config(&config);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("credentials from the environment"), "{text}");
    assert_no_secret(&text, &[SECRET]);
}

/// `release publish --upload` with the environment's keys; returns the output.
fn publish_upload(h: &Host, consul: &str, args: &[&str]) -> Output {
    h.command()
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL_S3", h.s3.endpoint())
        .env("AWS_REGION", "eu-west-1")
        .args([
            "release",
            "--consul",
            consul,
            "--app",
            "app",
            "--tier",
            "production",
            "publish",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_upload_stores_verifies_then_writes_the_manifest() {
    let h = Host::new().await;
    let consul = testkit::testserver::consul::ConsulServer::start(Default::default())
        .await
        .unwrap();
    // Over PART_SIZE (16 MiB): a multipart upload.
    let big = h.path("b1.tar.gz");
    let a = buildgen::write_build(BuildProfile::SMALL, 3, "b1", Format::TarGz, &big).unwrap();
    assert!(a.size > 16 << 20, "the SMALL build is {} bytes", a.size);
    let artifact = big.display().to_string();
    let args = [
        "--build",
        "b1",
        "--artifact",
        &artifact,
        "--upload",
        "s3://builds/releases/",
        "--path-style",
    ];
    // A part that always fails: the upload fails and no manifest is written.
    h.s3.fail_part(2);
    let out = publish_upload(&h, &consul.url(), &args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("s3://builds/releases/b1.tar.gz"), "{err}");
    assert!(
        consul.get("deploy/app/production").is_none(),
        "manifest written after a failed upload"
    );
    assert!(h.s3.get(BUCKET, "releases/b1.tar.gz").is_none());
    h.s3.fail_part(0);
    let out = publish_upload(&h, &consul.url(), &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(
        h.s3.get(BUCKET, "releases/b1.tar.gz").unwrap(),
        std::fs::read(&big).unwrap()
    );
    let manifest = String::from_utf8(consul.get("deploy/app/production").unwrap().value).unwrap();
    assert!(
        manifest.contains("\"s3://builds/releases/b1.tar.gz\""),
        "{manifest}"
    );
    assert_no_secret(&text, &[SECRET]);

    // The next build with a delta from b1: both objects go up (single
    // PUTs: a TINY build is under the part size), then the manifest.
    let next = h.path("b2.tar.gz");
    buildgen::write_build(BuildProfile::TINY, 3, "b2", Format::TarGz, &next).unwrap();
    let (next, base) = (next.display().to_string(), big.display().to_string());
    let out = publish_upload(
        &h,
        &consul.url(),
        &["--build", "b2", "--artifact", &next, "--delta-from", &base]
            .into_iter()
            .chain(["--upload", "s3://builds/releases", "--path-style"])
            .collect::<Vec<_>>(),
    );
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{text}");
    let manifest = String::from_utf8(consul.get("deploy/app/production").unwrap().value).unwrap();
    let delta_key = "releases/b2.tar.gz.delta.tar.zst";
    assert!(
        manifest.contains(&format!("s3://builds/{delta_key}")),
        "{manifest}"
    );
    let local_delta = std::fs::read(h.path("b2.tar.gz.delta.tar.zst")).unwrap();
    assert_eq!(h.s3.get(BUCKET, delta_key).unwrap(), local_delta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_close_to_expiry_are_fetched_again_before_use() {
    let mut h = Host::new().await;
    // IMDS says the keys expire in 2 minutes: inside the 5-minute refresh
    // window, so every signing fetches them again instead of using them
    // up to the end.
    h.instance_role(Duration::from_secs(120)).await;
    h.configure("", "");
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.s3.truncate(16 << 10, 3);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_served("b1").await;
    let imds = h.imds.as_ref().unwrap();
    assert!(imds.credential_gets() >= 2, "{}", imds.credential_gets());
    assert!(!h.log().contains("expired"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_task_role_and_shared_profile_are_sources_too() {
    let mut h = Host::new().await;
    h.instance_role(Duration::from_secs(3600)).await;
    let ecs = format!("{}/ecs/creds", h.imds.as_ref().unwrap().endpoint());
    h.env
        .push(("AWS_CONTAINER_CREDENTIALS_FULL_URI".into(), ecs));
    h.env.push((
        "AWS_CONTAINER_AUTHORIZATION_TOKEN".into(),
        testkit::testserver::imds::ECS_TOKEN.into(),
    ));
    h.configure("", "");
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_served("b1").await;
    assert!(h.log().contains("the ECS task role"), "{}", h.log());
    assert_eq!(
        h.imds.as_ref().unwrap().token_puts(),
        0,
        "IMDS used over ECS"
    );
    h.kill();

    // A profile in the shared credentials file, picked by AWS_PROFILE.
    let creds = h.path("aws-credentials");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n[profile ci]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
    )
    .unwrap();
    h.env = vec![
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            creds.display().to_string(),
        ),
        ("AWS_PROFILE".into(), "ci".into()),
    ];
    let (_, a2, url2) = h.build("b2", BuildProfile::TINY);
    h.publish(&buildgen::manifest_json("b2", &url2, &a2, Format::TarGz));
    h.start();
    h.wait_served("b2").await;
    assert!(h.log().contains("profile ci in"), "{}", h.log());
    assert_no_secret(&h.outputs(), &[SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_against_the_local_s3_server() {
    let tmp = deploy_agent_tests::fast_tempdir();
    let mut out = Vec::new();
    let records = testkit::demo::run_on(
        testkit::demo::DemoStore::S3,
        testkit::demo::DemoOptions {
            dir: Some(tmp.path().to_path_buf()),
            profile: BuildProfile::TINY,
            format: Format::TarGz,
        },
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(records.len(), 3, "{text}");
    assert!(text.contains("S3-compatible store"), "{text}");
    assert!(records[1].from_delta, "{text}");
    assert!(text.contains("demo complete"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_keys_come_from_sts() {
    let mut h = Host::new().await;
    h.instance_role(Duration::from_secs(3600)).await;
    let token_file = h.path("eks-token");
    std::fs::write(&token_file, testkit::testserver::imds::WEB_IDENTITY_TOKEN).unwrap();
    let sts = format!("{}/sts", h.imds.as_ref().unwrap().endpoint());
    h.env.push((
        "AWS_WEB_IDENTITY_TOKEN_FILE".into(),
        token_file.display().to_string(),
    ));
    h.env.push((
        "AWS_ROLE_ARN".into(),
        "arn:aws:iam::123456789012:role/deploy".into(),
    ));
    h.env.push(("AWS_ENDPOINT_URL_STS".into(), sts));
    h.configure("", "");
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_served("b1").await;
    let imds = h.imds.as_ref().unwrap();
    assert!(h.log().contains("web identity"), "{}", h.log());
    assert_eq!(imds.token_puts(), 0, "IMDS used over web identity");
    let current = imds.current();
    assert_no_secret(
        &h.outputs(),
        &[
            &current.secret,
            &current.token,
            testkit::testserver::imds::WEB_IDENTITY_TOKEN,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_in_another_region_is_named_in_status() {
    let mut h = Host::new().await;
    let key = h.key_file(SECRET);
    h.configure(&key, "");
    h.s3.set_region(Some("eu-central-1"));
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    h.publish(&buildgen::manifest_json("b1", &url, &a, Format::TarGz));
    h.start();
    h.wait_error(&[
        &url,
        "not in region eu-west-1",
        "eu-central-1",
        "[store] region",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reports_name_the_403_without_a_secret() {
    let mut h = Host::new().await;
    let consul = testkit::testserver::consul::ConsulServer::start(Default::default())
        .await
        .unwrap();
    let wrong = "wrong-secret-in-a-report-Qw7e9r";
    let key = h.key_file(wrong);
    // A fleet member watching its tier key and reporting to Consul (no
    // splay: not what this is about).
    let config = format!(
        "deploy-root = \"{root}\"\n[status]\nsocket = \"{sock}\"\n[consul]\naddress = \"{consul}\"\n\
         [fleet]\napp = \"app\"\ntier = \"production\"\nhost-id = \"h1\"\nsplay-max = \"0s\"\n\
         [store]\nendpoint = \"{endpoint}\"\npath-style = true\n{key}\n",
        root = h.path("root").display(),
        sock = h.path("agent.sock").display(),
        consul = consul.url(),
        endpoint = h.s3.endpoint(),
    );
    std::fs::write(h.path("config.toml"), config).unwrap();
    let (_, a, url) = h.build("b1", BuildProfile::TINY);
    let manifest = buildgen::manifest_json("b1", &url, &a, Format::TarGz);
    consul.put("deploy/app/production", manifest.as_bytes());
    h.start();
    h.wait_error(&["SignatureDoesNotMatch"]).await;
    let report = h
        .wait_for("no host report with the error", || {
            consul
                .get("deploy-hosts/app/h1")
                .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                .filter(|v| v.contains("SignatureDoesNotMatch"))
        })
        .await;
    assert!(report.contains(KEY_ID), "{report}");
    assert_no_secret(&report, &[wrong, SECRET]);
}

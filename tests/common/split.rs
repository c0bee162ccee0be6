//! The least-privilege split for the tests that play it (`installer_split`, `attacks`): a
//! simulated gateway built with `.split()` (`update-agent installer` as root on a socket in the
//! gateway's directory, root-owned 0600 slots and environment, the daemon role as `nobody`), the
//! image and wrong bytes on a loopback server and in files beside it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::sim::{Act, GatewayBuilder, RangeAnswers, User, tamper};
use super::{BIN, Backend, Gateway, ImageServer, describe as text, pattern, require};

pub const COMPATIBLE: &str = "acme-gw-split";
pub const ATTEMPTS: u32 = 3;
pub const IMAGE_LEN: usize = 300_017;
pub const FACTORY_B_LEN: usize = 400_009;
pub const IMAGE_PATH: &str = "/rootfs.img";
pub const WRONG_PATH: &str = "/wrong.img";
/// Sends the first 64 KiB of the image and then nothing, keeping the connection open.
pub const STALL_PATH: &str = "/stall.img";

/// The split on a simulated gateway, with the image on a loopback server and in
/// `rootfs.img` (and the same with one byte changed in `wrong.img`).
pub struct Split {
    pub gateway: Gateway,
    pub server: ImageServer,
    pub image: Vec<u8>,
}

derefs_to_gateway!(Split);

impl Split {
    pub fn new(backend: Backend) -> Split {
        Split::with(backend, |gateway| gateway)
    }

    /// The split whose gateway `more` sets up further (MQTT, health checks, the reboot).
    pub fn with(backend: Backend, more: impl FnOnce(GatewayBuilder) -> GatewayBuilder) -> Split {
        require("setpriv", "util-linux");
        let gateway = super::gateway()
            .backend(backend)
            .compatible(COMPATIBLE)
            .split()
            .configure(|c| c.install.stall_timeout = Duration::from_secs(5));
        let gateway = more(gateway).build().unwrap();
        let image = pattern(IMAGE_LEN, 1);
        let mut wrong = image.clone();
        wrong[IMAGE_LEN / 2] ^= 0x01;
        fs::write(gateway.path("rootfs.img"), &image).unwrap();
        fs::write(gateway.path("wrong.img"), &wrong).unwrap();
        let server = ImageServer::background(
            image.clone(),
            vec![
                (IMAGE_PATH, Act::Serve),
                (WRONG_PATH, Act::Body(wrong)),
                (STALL_PATH, Act::Stall { after: 65536 }),
            ],
        );
        let split = Split {
            gateway,
            server,
            image,
        };
        let out = split.as_daemon(&["boot-check"]);
        assert!(out.status.success(), "factory boot-check: {}", text(&out));
        split
    }

    /// Runs the binary as `nobody`/`nogroup` without supplementary groups: the daemon's user.
    pub fn as_nobody(&self, args: &[&str]) -> Output {
        User::Nobody
            .command(BIN)
            .args(args)
            .current_dir(self.dir())
            .output()
            .unwrap()
    }

    /// The daemon role: a one-shot command with the `[installer]` config, as `nobody`.
    pub fn as_daemon(&self, args: &[&str]) -> Output {
        self.run(args)
    }

    /// Boots the board, which must come up in `slot` (`why` says why), and runs `boot-check`
    /// there as the daemon's user, as the commit unit does; it must succeed.
    #[track_caller]
    pub fn boot_and_check(&mut self, slot: &str, why: &str) {
        assert_eq!(self.boot(), slot, "{why}");
        let out = self.as_daemon(&["boot-check"]);
        assert!(
            out.status.success(),
            "{why}: boot-check in {slot}: {}",
            text(&out)
        );
    }

    /// The last event the daemon recorded is `state` (`context` leads the failure message).
    #[track_caller]
    pub fn assert_last_event(&self, state: &str, context: &str) {
        let states = super::sim::states(&self.events());
        assert_eq!(
            states.last().map(String::as_str),
            Some(state),
            "{context}{states:?}"
        );
    }

    /// `update-agent install RELEASE` as the daemon's user, which must succeed.
    #[track_caller]
    pub fn install_as_daemon(&self, release: &Path) -> Output {
        let out = self.as_daemon(&["install", release.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "install as nobody: {}\ninstaller:\n{}",
            text(&out),
            self.installer_log()
        );
        out
    }

    /// `update-agent install RELEASE` as the daemon's user with the test hook
    /// `UPDATE_AGENT_CRASH_AT=point`: it must die of its SIGKILL there (a power cut of the daemon).
    #[track_caller]
    pub fn install_killed_at(&self, release: &Path, point: &str) {
        let out = self
            .command(&["install", release.to_str().unwrap()])
            .env("UPDATE_AGENT_CRASH_AT", point)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            None,
            "killed by its signal: {}",
            text(&out)
        );
    }

    /// The daemon role started in the background, its stdout into `log`.
    pub fn spawn_as_daemon(&self, args: &[&str], log: &Path) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn as_nobody_sh(&self, script: &str) -> Output {
        User::Nobody
            .command("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    }

    pub fn release(&self, version: &str, url_path: &str) -> PathBuf {
        self.release_at(version, 2, url_path)
    }

    pub fn release_at(&self, version: &str, security_version: u64, url_path: &str) -> PathBuf {
        self.gateway
            .release(version)
            .security_version(security_version)
            .image(&self.server.url(url_path), &self.image)
            .write(&self.path(&format!("release-{version}.json")))
            .unwrap()
    }

    /// A release of the file `name` beside the gateway, written to hold `stored`: the image
    /// itself, or with `zstd_of` the zstd compression of that image.
    pub fn file_release(
        &self,
        version: &str,
        security_version: u64,
        name: &str,
        stored: &[u8],
        zstd_of: Option<&[u8]>,
    ) -> PathBuf {
        fs::write(self.path(name), stored).unwrap();
        let url = format!("file://{}", self.path(name).display());
        let release = self
            .gateway
            .release(version)
            .security_version(security_version);
        let release = match zstd_of {
            Some(image) => release.zstd_image(&url, image, stored),
            None => release.image(&url, stored),
        };
        release
            .write(&self.path(&format!("release-{version}.json")))
            .unwrap()
    }

    /// `release create` of `image` with its block index and store in `serve/` (level
    /// `store_level`, compressed as `compress` names if given), signed by the gateway's signer,
    /// written as `release-{name}.json` and readable by the daemon's user.
    pub fn indexed_release(
        &self,
        image: &Path,
        version: &str,
        url: &str,
        store_level: &str,
        compress: Option<&str>,
        name: &str,
    ) -> PathBuf {
        if !self.path("signer.key").exists() {
            self.gateway
                .signer()
                .write_key_pair(&self.path("signer"))
                .unwrap();
        }
        let release = self.path(&format!("release-{name}.json"));
        let mut create = Command::new(BIN);
        create
            .args(["release", "create", "--key"])
            .arg(self.path("signer.key"))
            .arg("--image")
            .arg(image)
            .args(["--version", version, "--security-version", "3"])
            .args(["--compatible", COMPATIBLE, "--url", url])
            .args(["--store-level", store_level, "--out-dir"])
            .arg(self.path("serve"))
            .arg("--out")
            .arg(&release);
        if let Some(kind) = compress {
            create.args(["--compress", kind]);
        }
        let out = create.output().unwrap();
        assert!(out.status.success(), "release create: {}", text(&out));
        fs::set_permissions(&release, fs::Permissions::from_mode(0o644)).unwrap();
        release
    }

    /// `image` as `new.img`, a loopback server on `serve/` answering Range requests as `mode`
    /// says, and `indexed_release` of the image at that server's URL for what it serves
    /// (`new.img`, or `new.img.zst` when compressed).
    pub fn served_indexed_release(
        &self,
        image: &[u8],
        mode: RangeAnswers,
        store_level: &str,
        compress: Option<&str>,
        name: &str,
    ) -> (ImageServer, PathBuf) {
        let serve = self.path("serve");
        fs::create_dir(&serve).unwrap();
        fs::write(self.path("new.img"), image).unwrap();
        let server = ImageServer::serve_directory(serve, mode);
        let served = compress.map_or("/new.img", |_| "/new.img.zst");
        let release = self.indexed_release(
            &self.path("new.img"),
            "3.0",
            &server.url(served),
            store_level,
            compress,
            name,
        );
        (server, release)
    }

    /// The release with one byte of its signed manifest changed and the signatures kept.
    pub fn tampered(&self, release: &Path) -> PathBuf {
        let out = self.path("tampered.json");
        fs::write(&out, tamper(&fs::read(release).unwrap())).unwrap();
        out
    }

    /// A hand-made request to the installer, as `nobody` (the daemon's uid) or as root.
    pub fn request(&self, as_root: bool, args: &[&str]) -> (Output, Value) {
        let user = if as_root { User::Current } else { User::Nobody };
        self.gateway.request(&user, args)
    }

    /// A write request as the daemon's user: `release` with the bytes of the file `image`, into
    /// `slot` (`None`: the installer's pick, the inactive one), then `more` (`--resume-from N`).
    pub fn write_request(
        &self,
        slot: Option<&str>,
        release: impl AsRef<Path>,
        image: impl AsRef<Path>,
        more: &[&str],
    ) -> (Output, Value) {
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        let (release, image) = (path(release.as_ref()), path(image.as_ref()));
        let mut args = vec!["--op", "write", "--release", &release, "--image", &image];
        if let Some(slot) = slot {
            args.extend(["--slot", slot]);
        }
        args.extend(more);
        self.request(false, &args)
    }

    pub fn env_text(&self) -> String {
        self.env.text()
    }

    /// Slot B is not first in the boot order: nothing activated it.
    #[track_caller]
    pub fn assert_b_not_first(&self) {
        let order = self.env_var("BOOT_ORDER").unwrap_or_default();
        assert!(
            !order.starts_with('B'),
            "B was activated: {}",
            self.env_text()
        );
    }

    pub fn env_var(&self, name: &str) -> Option<String> {
        self.env.get(name)
    }

    /// Who holds the state directory's lock, as its lock file says.
    pub fn lock_holder(&self) -> String {
        fs::read_to_string(self.path("state/lock")).unwrap_or_default()
    }

    /// What the installer records of each slot and its floor (root's alone).
    pub fn ledger(&self) -> Value {
        serde_json::from_slice(&fs::read(self.path("installer-state/ledger.json")).unwrap())
            .unwrap()
    }
}

#[track_caller]
pub fn assert_refused(out: &Output, reply: &Value, reason: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert_eq!(reply["kind"], "refused", "{reply}");
    assert_eq!(reply["reason"], reason, "{reply}");
}

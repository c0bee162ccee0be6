//! Health checks of a trial boot: commands that must exit 0 and systemd units that must be
//! active, all within one timeout. A check that cannot even be started counts as failed: an
//! unhealthy system must not be committed because its checker is missing.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::config::Health;
use crate::engine::Failure;
use crate::reason::ReasonCode;
use crate::release::escape_for_log;

pub async fn run_checks(health: &Health) -> Result<(), Failure> {
    // The process group of the check running now: at the timeout, the whole group is killed,
    // not just its leader (`sh -c "sleep 300; true"` would leave `sleep` behind).
    let running = std::sync::Mutex::new(None);
    let checks = async {
        for argv in &health.commands {
            run_command(argv, &running).await?;
        }
        for unit in &health.units {
            run_command(
                &[
                    "systemctl".to_string(),
                    "is-active".to_string(),
                    "--quiet".to_string(),
                    unit.clone(),
                ],
                &running,
            )
            .await
            .map_err(|_| {
                Failure::new(
                    ReasonCode::HealthCheckFailed,
                    format!("unit {} is not active", escape_for_log(unit, 64)),
                )
            })?;
        }
        Ok(())
    };
    let result = tokio::time::timeout(health.timeout, checks).await;
    if let Some(group) = running.lock().unwrap_or_else(|e| e.into_inner()).take() {
        crate::system::kill_group(group);
    }
    match result {
        Ok(result) => result,
        Err(_) => Err(Failure::new(
            ReasonCode::HealthCheckFailed,
            format!(
                "health checks did not finish within {}",
                describe(health.timeout)
            ),
        )),
    }
}

async fn run_command(
    argv: &[String],
    running: &std::sync::Mutex<Option<u32>>,
) -> Result<(), Failure> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Failure::new(
            ReasonCode::HealthCheckFailed,
            "an empty health check command is configured",
        ));
    };
    let shown = escape_for_log(&argv.join(" "), 120);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A group of its own, killed whole when the check outlives the timeout (and after it
        // ends: nothing a check started stays behind).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            Failure::new(
                ReasonCode::HealthCheckFailed,
                format!("health check `{shown}` could not be started: {e}"),
            )
        })?;
    let group = child.id();
    *running.lock().unwrap_or_else(|e| e.into_inner()) = group;
    let status = child.wait().await;
    if let Some(group) = running.lock().unwrap_or_else(|e| e.into_inner()).take() {
        crate::system::kill_group(group);
    }
    let status = status.map_err(|e| {
        Failure::new(
            ReasonCode::HealthCheckFailed,
            format!("health check `{shown}` could not be waited for: {e}"),
        )
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(
            ReasonCode::HealthCheckFailed,
            format!("health check `{shown}` failed ({status})"),
        ))
    }
}

fn describe(duration: Duration) -> String {
    format!("{} s", duration.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(commands: &[&[&str]], timeout: u64) -> Health {
        Health {
            commands: commands
                .iter()
                .map(|argv| argv.iter().map(|s| s.to_string()).collect())
                .collect(),
            units: Vec::new(),
            timeout: Duration::from_secs(timeout),
        }
    }

    #[tokio::test]
    async fn passing_commands_pass_and_the_first_failure_is_named() {
        assert_eq!(
            run_checks(&health(&[&["true"], &["true"]], 10)).await,
            Ok(())
        );
        let failure = run_checks(&health(&[&["true"], &["false"]], 10))
            .await
            .unwrap_err();
        assert_eq!(failure.reason, ReasonCode::HealthCheckFailed);
        assert!(
            failure.message.contains("`false` failed"),
            "{}",
            failure.message
        );
    }

    #[tokio::test]
    async fn a_missing_checker_is_a_failure() {
        let failure = run_checks(&health(&[&["/nonexistent/check"]], 10))
            .await
            .unwrap_err();
        assert!(failure.message.contains("could not be started"));
    }

    /// `argv` as the only check with a 1 s timeout fails, saying it did not finish in time.
    async fn times_out(argv: &[&str]) {
        let failure = run_checks(&health(&[argv], 1)).await.unwrap_err();
        let message = failure.message;
        assert!(message.contains("within 1 s"), "{message}");
    }

    #[tokio::test]
    async fn a_check_that_hangs_is_killed_with_its_children_at_the_timeout() {
        let hang = crate::system::tests::Hanging::new("; true");
        times_out(&["sh", "-c", &hang.script]).await;
        assert!(hang.child_gone(), "the check's child survived");
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_at_the_timeout() {
        times_out(&["sleep", "30"]).await;
    }
}

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
    let checks = async {
        for argv in &health.commands {
            run_command(argv).await?;
        }
        for unit in &health.units {
            run_command(&[
                "systemctl".to_string(),
                "is-active".to_string(),
                "--quiet".to_string(),
                unit.clone(),
            ])
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
    match tokio::time::timeout(health.timeout, checks).await {
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

async fn run_command(argv: &[String]) -> Result<(), Failure> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Failure::new(
            ReasonCode::HealthCheckFailed,
            "an empty health check command is configured",
        ));
    };
    let shown = escape_for_log(&argv.join(" "), 120);
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A check that outlives the timeout is killed, not left behind.
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| {
            Failure::new(
                ReasonCode::HealthCheckFailed,
                format!("health check `{shown}` could not be started: {e}"),
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

    #[tokio::test]
    async fn a_check_that_hangs_fails_at_the_timeout() {
        let failure = run_checks(&health(&[&["sleep", "30"]], 1))
            .await
            .unwrap_err();
        assert!(
            failure.message.contains("within 1 s"),
            "{}",
            failure.message
        );
    }
}

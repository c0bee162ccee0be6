use std::path::PathBuf;
use std::process::ExitCode;

use update_agent::keys::{self, KeyId};

#[derive(clap::Args)]
pub struct Args {
    /// Path prefix of the files to write; refuses to overwrite existing ones
    #[arg(long, value_name = "PREFIX")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let key = keys::generate_signing_key()?;
    let (private, public) = keys::write_key_pair(&key, &args.out)?;
    println!("private key: {} (keep it offline)", private.display());
    println!(
        "public key:  {} (install it in the devices' trust anchor)",
        public.display()
    );
    println!("key id:      {}", KeyId::of(&key.verifying_key()));
    Ok(ExitCode::SUCCESS)
}

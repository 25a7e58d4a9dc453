use clap::Args;

#[derive(Args)]
pub struct EnhanceArgs {}

pub fn run(_args: EnhanceArgs) -> anyhow::Result<()> {
    anyhow::bail!("'enhance' is being built")
}

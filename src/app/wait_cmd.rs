//! `imaging wait`: until every node answers over SSH, or the deadline.

use crate::app::cli::{self, Cli};
use crate::app::drive::{drive, run_info};
use crate::app::exit::{Exit, UsageError};
use crate::app::settings::{deadline, output_mode, select, ssh_settings};
use crate::config::Loaded;
use crate::engine::wait;
use crate::ui;

pub(crate) async fn run_wait(
    cli: &Cli,
    args: &cli::WaitArgs,
    loaded: &Loaded,
) -> Result<Exit, UsageError> {
    let nodes = select(loaded, &args.nodes)?;
    let deadline = deadline(args.timeout, loaded.config.wait.timeout)?;
    let ssh = ssh_settings(loaded, &nodes)?;
    let mode = match output_mode(cli) {
        _ if args.silent && !cli.global.json => ui::Mode::Silent,
        // `fit01 ssh OK` lines are what wait shows on a terminal too.
        ui::Mode::Bars => ui::Mode::Lines,
        mode => mode,
    };
    let info = run_info(cli, "wait", &nodes, args.verbose, None);
    let verbose = args.verbose;
    Ok(drive(mode, info, move |report, cancel| async move {
        tokio::select! {
            _ = wait::wait_all(nodes, ssh, deadline, verbose, report) => {}
            _ = cancel.cancelled() => {}
        }
    })
    .await)
}

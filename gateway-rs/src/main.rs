//! `fleetward-gateway`: parse and validate the settings, set up logs and spans, run the
//! server until SIGTERM/SIGINT (see `server::run` for the shutdown sequence).

use std::process::ExitCode;

use clap::Parser;
use fleetward_gateway::config::{Args, Settings};
use fleetward_gateway::{server, telemetry};

fn main() -> ExitCode {
    let settings = match Settings::from_args(Args::parse()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleetward-gateway: invalid settings: {e}");
            return ExitCode::from(2);
        }
    };
    // Outside the runtime: the OTLP exporter's blocking HTTP client owns a runtime of its own.
    let telemetry = match telemetry::init(settings.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fleetward-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gateway")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetward-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(server::run(settings));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    telemetry.shutdown();
    code
}

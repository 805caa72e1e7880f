//! The `shardmq` binary: parse the command line, load the config, start the shards, and wait for
//! SIGINT or SIGTERM to shut down gracefully.

use std::io::Write;
use std::process::ExitCode;

use log::{error, info};
use shardmq::cli::{self, Command, USAGE};
use shardmq::config::Config;
use shardmq::runtime::Broker;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn init_logging(level: &str) {
    let mut builder = env_logger::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(filter) => builder.parse_filters(&filter),
        // glommio's reactor logs an error for every DMA file on a device without polled IO
        // ("probing iopoll support"), which is harmless and not ours to fix.
        Err(_) => builder.parse_filters(&format!("{level},glommio::reactor=off")),
    };
    builder.format_timestamp_millis().init();
}

fn main() -> ExitCode {
    let (config_path, overrides) = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run {
            config_path,
            overrides,
        }) => (config_path, overrides),
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("shardmq {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("shardmq: {message}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(config_path.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("shardmq: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log_level);

    // Registered before the shards start, so a signal that arrives during start-up is not lost.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let broker = match Broker::start(&config) {
        Ok(broker) => broker,
        Err(e) => {
            error!("start-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts and tests read the bound address (port 0 picks one) from this line.
    println!("shardmq listening on {}", broker.local_addr());
    let _ = std::io::stdout().flush();

    let shutdown = broker.shutdown_handle();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            info!("signal {signal} received: shutting down");
            shutdown.shutdown();
        }
    });
    // Returns when every shard has stopped: after a signal, or at once if a shard fails (it
    // stops the others).
    match broker.join() {
        Ok(()) => {
            info!("shut down cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("shutdown: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `razar-certs`: the command line of the fleet CA.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use razar_certs::{parse_span, Ca, CaError, Entry, InitOptions, IssueOptions, Issued};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

const AFTER_HELP: &str = "\
Files in the CA directory (--dir, or $RAZAR_CA_DIR):
  ca.pem, ca.key                   fleet CA certificate and key
  collector.pem, collector.key     collector server certificate
  agents/<host>.pem, .key          agent certificates (URI SAN razar://host/<host>)
  operators/<name>.pem, .key       operator certificates (URI SAN razar://operator/<name>)
  crl.der, crl.pem                 latest signed CRL (give crl.der to the collector)
  index.json                       every issued certificate, its serial and revocation

Private keys are created with mode 0600. Existing files are never overwritten without --force.
Files are replaced atomically (temporary file, fsync, rename). A revocation is published in
the CRL before the index records it; a revocation found in the CRL but not in the index
(an interrupted revoke) is adopted by the next command that changes the CA.
Exit codes: 0 success, 2 a mistake on the command line or in its input, 1 anything else.";

/// The Razar fleet CA: issue, revoke and list certificates, publish the CRL.
#[derive(Debug, Parser)]
#[command(name = "razar-certs", version, after_help = AFTER_HELP)]
struct Cli {
    /// The CA directory (every command needs one).
    #[arg(long, global = true, env = "RAZAR_CA_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the fleet CA (DIR/ca.pem, DIR/ca.key, DIR/index.json).
    Init {
        /// Common name of the CA certificate.
        #[arg(long, default_value = "Razar fleet CA")]
        name: String,
        /// Lifetime of the CA certificate in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the fleet CA.
    Issue {
        #[command(subcommand)]
        what: IssueCommand,
    },
    /// Revoke a certificate by serial (hex) or certificate file, publishing a new CRL that
    /// lists it before the index records it (an interrupted revoke: run it again).
    Revoke {
        /// A serial as printed by `issue` and `list`, or the path of a certificate (PEM).
        #[arg(value_name = "SERIAL|FILE")]
        target: String,
        /// How long the new CRL is valid (s, m, h, d, w).
        #[arg(long, default_value = "7d", value_name = "SPAN")]
        next_update: String,
    },
    /// Write a freshly signed CRL to DIR/crl.der and DIR/crl.pem.
    Crl {
        /// How long the CRL is valid (s, m, h, d, w); publish a new one before then.
        #[arg(long, default_value = "7d", value_name = "SPAN")]
        next_update: String,
    },
    /// List issued certificates.
    List {
        /// Only unrevoked certificates expiring within this span (e.g. 30d), expired included.
        #[arg(long, value_name = "SPAN")]
        expiring: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
enum IssueCommand {
    /// The collector's server certificate (DIR/collector.pem, .key).
    Collector {
        #[command(flatten)]
        common: IssueArgs,
        /// DNS name or IP address agents use to reach the collector (repeatable).
        #[arg(long = "dns", value_name = "NAME", required = true, num_args = 1..)]
        dns: Vec<String>,
    },
    /// An agent's client certificate (DIR/agents/<ID>.pem, .key).
    Agent {
        #[command(flatten)]
        common: IssueArgs,
        /// The host id (letters, digits, '.', '-', '_').
        #[arg(long = "host", value_name = "ID")]
        host: String,
    },
    /// An operator's client certificate (DIR/operators/<NAME>.pem, .key).
    Operator {
        #[command(flatten)]
        common: IssueArgs,
        /// The operator's name (letters, digits, '.', '-', '_').
        #[arg(long, value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// Validity in days (default: collector 365, agent 90, operator 30).
    #[arg(long)]
    days: Option<u32>,
    /// Overwrite existing certificate and key files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return clap_error(&err),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `razar-certs list | head -1`: the reader has what it wanted.
        Err(err) if err.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("razar-certs: error: {}", one_line(&format!("{err:#}")));
            let user_mistake = err.chain().any(|cause| {
                cause
                    .downcast_ref::<CaError>()
                    .is_some_and(CaError::is_user_error)
                    || cause.is::<NoDir>()
            });
            ExitCode::from(if user_mistake { 2 } else { 1 })
        }
    }
}

/// Prints help and version as clap does; collapses usage errors to one line, exit 2.
fn clap_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Printing help can only fail on a closed stdout; nothing useful to do then.
            let _ = err.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(2)
        }
        _ => {
            let rendered = err.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|line| !line.starts_with("Usage:"))
                .filter(|line| !line.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("razar-certs: error: {message} (see --help)");
            ExitCode::from(2)
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `--dir` missing from both the command line and the environment.
#[derive(Debug, thiserror::Error)]
#[error("no CA directory: pass --dir DIR or set RAZAR_CA_DIR")]
struct NoDir;

/// Standard output was closed by its reader (e.g. `| head -1`): not an error.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
struct StdoutClosed;

/// A failed write to standard output: [`StdoutClosed`] when the reader went away.
fn stdout_error(err: io::Error) -> anyhow::Error {
    if err.kind() == io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(err).context("writing to standard output")
    }
}

/// `writeln!` to `out`, returning [`stdout_error`] from the enclosing function on failure.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, $($arg)*).map_err(stdout_error)?
    };
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(dir) = cli.dir else {
        return Err(NoDir.into());
    };
    let out = &mut io::stdout().lock();
    match cli.command {
        Command::Init { name, days, force } => {
            let ca = Ca::init(
                &dir,
                &InitOptions {
                    common_name: name,
                    days,
                    force,
                },
            )?;
            say!(out, "initialised CA in {}", ca.dir().display());
            say!(out, "  certificate {}", ca.cert_path().display());
            say!(
                out,
                "  key         {}",
                ca.dir().join(razar_certs::CA_KEY_FILE).display()
            );
        }
        Command::Issue { what } => issue(out, &dir, what)?,
        Command::Revoke {
            target,
            next_update,
        } => {
            let next_update = parse_span(&next_update)?;
            let mut ca = Ca::load(&dir)?;
            let as_path = Path::new(&target);
            // One step: the CRL listing the serial is published before the index records it.
            let revocation = if looks_like_path(&target) || as_path.is_file() {
                ca.revoke_file(as_path, next_update)?
            } else {
                ca.revoke(&target, next_update)?
            };
            let entry = &revocation.entry;
            say!(
                out,
                "revoked {} {} (serial {})",
                entry.kind,
                entry.name,
                entry.serial
            );
            print_crl(out, &revocation.crl)?;
        }
        Command::Crl { next_update } => {
            let next_update = parse_span(&next_update)?;
            let mut ca = Ca::load(&dir)?;
            let crl = ca.write_crl(next_update)?;
            print_crl(out, &crl)?;
        }
        Command::List { expiring, output } => {
            let ca = Ca::load(&dir)?;
            let now = SystemTime::now();
            let entries: Vec<&Entry> = match expiring {
                Some(span) => ca.expiring(parse_span(&span)?, now),
                None => ca.entries().iter().collect(),
            };
            match output {
                Format::Json => {
                    let text = serde_json::to_string_pretty(&entries)
                        .context("encoding the list as JSON")?;
                    say!(out, "{text}");
                }
                Format::Table => print_table(out, &entries, now)?,
            }
        }
    }
    Ok(())
}

fn looks_like_path(target: &str) -> bool {
    target.contains('/') || target.ends_with(".pem") || target.ends_with(".crt")
}

fn issue(out: &mut impl Write, dir: &Path, what: IssueCommand) -> anyhow::Result<()> {
    let (common, default_days) = match &what {
        IssueCommand::Collector { common, .. } => (common, 365),
        IssueCommand::Agent { common, .. } => (common, 90),
        IssueCommand::Operator { common, .. } => (common, 30),
    };
    let mut options = IssueOptions::days(common.days.unwrap_or(default_days))?;
    options.force = common.force;
    let mut ca = Ca::load(dir)?;
    let issued = match &what {
        IssueCommand::Collector { dns, .. } => ca.issue_collector(dns, &options)?,
        IssueCommand::Agent { host, .. } => ca.issue_agent(host, &options)?,
        IssueCommand::Operator { name, .. } => ca.issue_operator(name, &options)?,
    };
    print_issued(out, &issued)
}

fn print_issued(out: &mut impl Write, issued: &Issued) -> anyhow::Result<()> {
    say!(
        out,
        "issued {} certificate for {}",
        issued.kind,
        issued.name
    );
    say!(out, "  serial      {}", issued.serial);
    say!(out, "  not after   {}", format_time(issued.not_after));
    say!(out, "  certificate {}", issued.cert_path.display());
    say!(out, "  key         {}", issued.key_path.display());
    Ok(())
}

fn print_crl(out: &mut impl Write, crl: &razar_certs::CrlWritten) -> anyhow::Result<()> {
    say!(
        out,
        "wrote CRL #{} listing {} revoked certificate(s), next update {}",
        crl.number,
        crl.revoked.len(),
        format_time(crl.next_update)
    );
    say!(out, "  {}", crl.der_path.display());
    say!(out, "  {}", crl.pem_path.display());
    Ok(())
}

fn format_time(at: SystemTime) -> String {
    let at = razar_certs::time::OffsetDateTime::from(at);
    format_offset(at)
}

fn format_offset(at: razar_certs::time::OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&razar_certs::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

fn days_left(entry: &Entry, now: SystemTime) -> i64 {
    let now = razar_certs::time::OffsetDateTime::from(now);
    let left = entry.not_after - now;
    // Whole days, rounded towards minus infinity so an expired certificate reads negative.
    left.whole_seconds().div_euclid(86_400)
}

fn print_table(out: &mut impl Write, entries: &[&Entry], now: SystemTime) -> anyhow::Result<()> {
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            [
                e.kind.to_string(),
                if e.dns.is_empty() {
                    e.name.clone()
                } else {
                    format!("{} ({})", e.name, e.dns.join(","))
                },
                e.serial.clone(),
                format_offset(e.not_after),
                days_left(e, now).to_string(),
                e.revoked_at
                    .map(format_offset)
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = [
        "KIND",
        "SUBJECT",
        "SERIAL",
        "NOT AFTER",
        "DAYS LEFT",
        "REVOKED",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.truncate(text.trim_end().len());
        text
    };
    say!(out, "{}", line(header));
    for row in &rows {
        say!(
            out,
            "{}",
            line([
                row[0].as_str(),
                row[1].as_str(),
                row[2].as_str(),
                row[3].as_str(),
                row[4].as_str(),
                row[5].as_str(),
            ])
        );
    }
    Ok(())
}

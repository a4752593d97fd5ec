//! Failures of a command: a one-line message for stderr and the exit code of `cemsg --help`,
//! with the mapping of every library error kind to an exit code in one place.

use std::fmt;
use std::process::ExitCode;

use ce_messaging::error::PublishErrorKind;
use ce_messaging::error::{
    ConnectError, ConnectErrorKind, Error, ListenError, ListenErrorKind, RemoteError, RequestError,
    RequestErrorKind, StreamError, StreamErrorKind,
};
use ce_messaging::events::PublishError;
use ce_messaging::jetstream::dead_letters::{DeadLetterError, DeadLetterErrorKind};

/// Usage or configuration error.
pub const EXIT_USAGE: u8 = 1;
/// Connection error.
pub const EXIT_CONNECTION: u8 = 2;
/// Timeout.
pub const EXIT_TIMEOUT: u8 = 3;
/// No responders.
pub const EXIT_NO_RESPONDERS: u8 = 4;
/// The responder answered with an error.
pub const EXIT_REMOTE: u8 = 5;
/// Stream or dead letter not found.
pub const EXIT_NOT_FOUND: u8 = 6;
/// Refused or failed otherwise.
pub const EXIT_OTHER: u8 = 7;

/// Why a command failed: exit code and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// Prints the message on stderr as one line and returns the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("cemsg: {}", one_line(&self.message));
        ExitCode::from(self.code)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The message with line breaks (and runs of blanks they leave) folded into single spaces.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn failure<K>(code: u8, err: &Error<K>) -> Failure
where
    K: fmt::Display + fmt::Debug + Copy,
{
    Failure::new(code, err.to_string())
}

impl From<ConnectError> for Failure {
    fn from(err: ConnectError) -> Self {
        let code = match err.kind() {
            ConnectErrorKind::InvalidConfig | ConnectErrorKind::Credentials => EXIT_USAGE,
            _ => EXIT_CONNECTION,
        };
        failure(code, &err)
    }
}

impl From<PublishError> for Failure {
    fn from(err: PublishError) -> Self {
        let code = match err.kind() {
            PublishErrorKind::TimedOut => EXIT_TIMEOUT,
            PublishErrorKind::StreamNotFound => EXIT_NOT_FOUND,
            PublishErrorKind::Encode
            | PublishErrorKind::InvalidType
            | PublishErrorKind::InvalidPriority
            | PublishErrorKind::InvalidSchedule => EXIT_USAGE,
            PublishErrorKind::ConnectionClosed | PublishErrorKind::Disconnected => EXIT_CONNECTION,
            _ => EXIT_OTHER,
        };
        failure(code, err.error())
    }
}

impl From<RequestError> for Failure {
    fn from(err: RequestError) -> Self {
        let code = match err.kind() {
            RequestErrorKind::TimedOut => EXIT_TIMEOUT,
            RequestErrorKind::NoResponders => EXIT_NO_RESPONDERS,
            RequestErrorKind::Remote => EXIT_REMOTE,
            RequestErrorKind::ConnectionClosed | RequestErrorKind::Disconnected => EXIT_CONNECTION,
            RequestErrorKind::Encode | RequestErrorKind::InvalidOptions => EXIT_USAGE,
            _ => EXIT_OTHER,
        };
        if let Some(remote) = RemoteError::of(&err) {
            return Failure::new(
                code,
                format!("remote error {}: {}", remote.code(), remote.text()),
            );
        }
        failure(code, &err)
    }
}

impl From<ListenError> for Failure {
    fn from(err: ListenError) -> Self {
        let code = match err.kind() {
            ListenErrorKind::StreamNotFound => EXIT_NOT_FOUND,
            ListenErrorKind::ConnectionClosed => EXIT_CONNECTION,
            ListenErrorKind::InvalidOptions => EXIT_USAGE,
            // Another instance of the durable listens with other types: refused, exit 7.
            _ => EXIT_OTHER,
        };
        failure(code, &err)
    }
}

impl From<StreamError> for Failure {
    fn from(err: StreamError) -> Self {
        let code = match err.kind() {
            StreamErrorKind::NotFound => EXIT_NOT_FOUND,
            _ => EXIT_OTHER,
        };
        failure(code, &err)
    }
}

impl From<DeadLetterError> for Failure {
    fn from(err: DeadLetterError) -> Self {
        failure(dead_letter_code(err.kind()), &err)
    }
}

/// The exit code of a dead-letter error kind.
pub fn dead_letter_code(kind: DeadLetterErrorKind) -> u8 {
    match kind {
        DeadLetterErrorKind::StreamNotFound
        | DeadLetterErrorKind::NotFound
        | DeadLetterErrorKind::OriginalGone => EXIT_NOT_FOUND,
        DeadLetterErrorKind::TimedOut => EXIT_TIMEOUT,
        _ => EXIT_OTHER,
    }
}

/// Exits for a command line clap refused (or help / version, which are not errors): one line
/// on stderr and exit code 1, so usage errors share the code of configuration errors.
pub fn clap_exit(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(EXIT_USAGE)
        }
        _ => {
            // The first paragraph says what is wrong; usage and tips follow after a blank line.
            let rendered = err.render().to_string();
            let first: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .collect();
            let first = one_line(&first.join(" "));
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            Failure::new(EXIT_USAGE, format!("{first} (see --help)")).report()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_folded_into_one_line() {
        assert_eq!(one_line("a\nb\r\n  c\t d"), "a b c d");
    }

    #[test]
    fn request_errors_map_to_the_documented_codes() {
        let code = |kind| Failure::from(Error::new(kind)).code;
        assert_eq!(code(RequestErrorKind::TimedOut), EXIT_TIMEOUT);
        assert_eq!(code(RequestErrorKind::NoResponders), EXIT_NO_RESPONDERS);
        assert_eq!(code(RequestErrorKind::ConnectionClosed), EXIT_CONNECTION);
        assert_eq!(code(RequestErrorKind::Disconnected), EXIT_CONNECTION);
        let remote = Failure::from(RemoteError::new(404, "unknown op").into_request_error());
        assert_eq!(remote.code, EXIT_REMOTE);
        assert_eq!(remote.message, "remote error 404: unknown op");
    }

    #[test]
    fn publish_errors_map_to_the_documented_codes() {
        let code = |kind| Failure::from(PublishError::new(kind, None)).code;
        assert_eq!(code(PublishErrorKind::InvalidType), EXIT_USAGE);
        assert_eq!(code(PublishErrorKind::Disconnected), EXIT_CONNECTION);
        assert_eq!(code(PublishErrorKind::TimedOut), EXIT_TIMEOUT);
    }

    #[test]
    fn dead_letter_errors_map_to_the_documented_codes() {
        assert_eq!(
            dead_letter_code(DeadLetterErrorKind::NotFound),
            EXIT_NOT_FOUND
        );
        assert_eq!(
            dead_letter_code(DeadLetterErrorKind::StreamNotFound),
            EXIT_NOT_FOUND
        );
        assert_eq!(
            dead_letter_code(DeadLetterErrorKind::TimedOut),
            EXIT_TIMEOUT
        );
        assert_eq!(dead_letter_code(DeadLetterErrorKind::Publish), EXIT_OTHER);
        assert_eq!(
            dead_letter_code(DeadLetterErrorKind::WrongStream),
            EXIT_OTHER
        );
        assert_eq!(
            dead_letter_code(DeadLetterErrorKind::OriginalGone),
            EXIT_NOT_FOUND
        );
    }
}

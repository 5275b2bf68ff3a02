//! One agent session: the Hello exchange, then one load, save or status
//! request.

use std::os::fd::AsFd;

use std::fs::File;
use std::io;
use std::io::{BufReader, Read, Write};

use crate::agent::env::AgentEnv;
use crate::agent::error::malformed;
use crate::agent::error::{AgentError, closed_as};
use crate::agent::load::load;
use crate::agent::replies::Replies;
use crate::agent::save::save;
use crate::agent::target::LoadRequest;
use crate::proto::{Msg, ProtocolError, check_hello, read_msg_sync};

/// `imaging agent`: serve one session on stdin/stdout. Returns the exit code.
pub fn run_agent() -> i32 {
    let env = AgentEnv::from_home();
    // Own descriptors rather than the std handles: no extra buffering layer,
    // and the input can move to the receiving thread.
    let own = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(File::from);
    crate::proto::pipes::widen(io::stdin().as_fd());
    crate::proto::pipes::widen(io::stdout().as_fd());
    let result = match (own(io::stdin().as_fd()), own(io::stdout().as_fd())) {
        (Ok(input), Ok(output)) => serve(input, output, &env),
        _ => serve(io::stdin(), io::stdout(), &env),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("imaging agent: {e}");
            e.exit_code()
        }
    }
}

/// Serve one session: Hello exchange, then one LoadBegin, SaveBegin or
/// StatusBegin request to completion. On error the controller is sent `Msg::Error`
/// (best effort, once) before this returns.
pub fn serve<R: Read + Send, W: Write>(
    input: R,
    output: W,
    env: &AgentEnv,
) -> Result<(), AgentError> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let mut out = Replies::new(output);
    let result = session(&mut input, &mut out, env);
    if let Err(e) = &result {
        out.report(e);
    }
    result
}

pub(super) fn session<R: Read + Send, W: Write>(
    input: &mut R,
    out: &mut Replies<W>,
    env: &AgentEnv,
) -> Result<(), AgentError> {
    out.reply(&Msg::hello())?;
    let hello = read_msg_sync(input).map_err(|e| closed_as(e, "before Hello"))?;
    check_hello(&hello)?;
    let tool = match &hello {
        Msg::Hello { build, .. } => build.clone(),
        _ => String::new(),
    };
    let request = match read_msg_sync(input) {
        // A controller may only check the agent's version.
        Err(ProtocolError::Closed) => return Ok(()),
        other => other?,
    };
    match request {
        Msg::LoadBegin(begin) => {
            let mut req = LoadRequest::new(begin)?;
            req.origin.tool = tool;
            load(input, out, env, &req)
        }
        Msg::SaveBegin {
            target,
            chunk_size,
            level,
            raw,
            holder,
        } => save(out, env, &target, chunk_size, level, &holder, raw),
        Msg::StatusBegin { targets } => crate::agent::status::status(input, out, env, &targets),
        Msg::CleanBegin(req) => crate::agent::clean::clean(out, env, &req),
        Msg::Error { message, .. } => Err(AgentError::Peer(message)),
        other => Err(malformed(format!(
            "expected LoadBegin, SaveBegin or StatusBegin, got {}",
            other.name()
        ))),
    }
}

#[cfg(test)]
mod tests {

    use crate::image::MAX_CHUNK_SIZE;

    use crate::agent::stamp::Stamp;
    use crate::agent::testkit::*;
    use crate::proto::{Codec, LoadBegin, MAGIC, Msg, VERSION};

    #[test]
    fn hello_only_is_a_clean_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (result, replies) = run(&env(&dir), &[]);
        result.unwrap();
        assert_eq!(replies, vec![Msg::hello()]);
    }

    #[test]
    fn malformed_input_is_refused_with_exit_code_2() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rt", 0, 14);
        let hello = encode(&[Msg::hello()]);
        let with_hello = |msgs: &[Msg]| [hello.clone(), encode(msgs)].concat();

        assert_malformed(&env, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], "refused");
        let wrong_magic = Msg::Hello {
            magic: *b"IMAGINE\0",
            version: VERSION,
            build: "x".into(),
        };
        assert_malformed(&env, &encode(&[wrong_magic]), "magic");
        let wrong_version = Msg::Hello {
            magic: MAGIC,
            version: VERSION + 1,
            build: "x".into(),
        };
        assert_malformed(&env, &encode(&[wrong_version]), "version");
        assert_malformed(&env, &encode(&[image.chunk(0)]), "expected Hello");
        assert_malformed(
            &env,
            &with_hello(&[image.chunk(0)]),
            "expected LoadBegin, SaveBegin or StatusBegin, got Chunk",
        );
        assert_malformed(
            &env,
            &with_hello(&[
                image.begin(&target, false),
                Msg::Chunk {
                    index: 2,
                    codec: Codec::Raw,
                    data: vec![],
                },
            ]),
            "out of range",
        );
        assert_malformed(
            &env,
            &with_hello(&[image.begin(&target, false), Msg::SaveEnd]),
            "unexpected SaveEnd",
        );
        for chunk_size in [0, 1000, CS / 2, 3 * CS, MAX_CHUNK_SIZE * 2, u32::MAX] {
            let base = image.load_begin(&target, false);
            let save = Msg::SaveBegin {
                target: base.target.clone(),
                chunk_size,
                level: 3,
                raw: false,
                holder: String::new(),
            };
            let begin = Msg::LoadBegin(LoadBegin { chunk_size, ..base });
            assert_malformed(&env, &with_hello(&[begin]), "chunk size");
            assert_malformed(&env, &with_hello(&[save]), "chunk size");
        }
        let fresh = dir.path().join("fresh.img");
        let base = image.load_begin(&fresh, false);
        let (mut digests, zero) = (base.digests.clone(), base.zero.clone());
        digests.push(1);
        let begin = |digests: Vec<u128>, zero: Vec<u8>| {
            Msg::LoadBegin(LoadBegin {
                digests,
                zero,
                ..base.clone()
            })
        };
        assert_malformed(
            &env,
            &with_hello(&[begin(digests.clone(), zero.clone())]),
            "digests",
        );
        digests.pop();
        assert_malformed(
            &env,
            &with_hello(&[begin(digests, vec![0, 0])]),
            "zero bitmap",
        );
        assert!(
            !fresh.exists(),
            "nothing is created for a malformed request"
        );

        // Every cut of a valid start is an error (or, right after the Hello, a probe).
        let input = with_hello(&[image.begin(&target, false)]);
        for cut in 0..input.len() {
            let (result, _) = run_bytes(&env, &input[..cut]);
            match result {
                // The stream ending inside a length prefix is a clean close.
                Ok(()) => assert!((hello.len()..hello.len() + 4).contains(&cut), "cut {cut}"),
                Err(e) => assert!([2, 3].contains(&e.exit_code()), "{e}"),
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        #[test]
        fn random_input_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let (result, _) = run_bytes(&env(&dir), &bytes);
            let e = err_of(result);
            proptest::prop_assert!([2, 3].contains(&e.exit_code()));
        }

        #[test]
        fn random_frames_after_hello_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let input = [encode(&[Msg::hello()]), bytes].concat();
            if let Err(e) = run_bytes(&env(&dir), &input).0 {
                proptest::prop_assert!([2, 3].contains(&e.exit_code()));
            }
        }

        #[test]
        fn random_frames_during_a_load_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let dir = tempfile::tempdir().unwrap();
            let image = Image::new("rt", 7, 15);
            let input = [
                encode(&[Msg::hello(), image.begin(&dir.path().join("disk.img"), false)]),
                bytes,
            ]
            .concat();
            let e = err_of(run_bytes(&env(&dir), &input).0);
            proptest::prop_assert!([2, 3].contains(&e.exit_code()));
        }

        #[test]
        fn stamp_decoding_never_panics(text in ".{0,200}") {
            let _ = Stamp::decode(&text);
        }
    }
}

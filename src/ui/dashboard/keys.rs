//! Keys: what each key does to the [`UiState`], and the thread that reads
//! them from the terminal.

use std::io::{self};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc::UnboundedSender;

use crate::ui::view::View;

use super::state::UiState;

/// How long the key reader waits before checking whether it should stop.
const KEY_POLL: Duration = Duration::from_millis(100);

/// What the loop gets besides engine events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Key(KeyEvent),
    Resize,
}

/// What a key asks the loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Nothing beyond redrawing.
    None,
    /// The user confirmed cancelling the run.
    Cancel,
    /// The run is over and the user is done looking at it.
    Quit,
}

impl UiState {
    fn open_cancel_prompt(&mut self) {
        if !self.cancelling {
            self.confirm_cancel = true;
        }
    }

    /// Act on one key. `q`, Esc or Ctrl-C ask "Cancel the run? y/n" (in
    /// raw mode Ctrl-C is a key, not SIGINT); `y` (or Ctrl-C again) answers
    /// [`KeyAction::Cancel`]. Arrows, PgUp/PgDn, Home/End scroll, `f`
    /// filters, `?` shows the keys. On the final screen every other key is
    /// [`KeyAction::Quit`].
    pub fn on_key(&mut self, key: KeyEvent, view: &View) -> KeyAction {
        if key.kind == KeyEventKind::Release {
            return KeyAction::None;
        }
        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
            && matches!(key.code, KeyCode::Char('c' | 'C'));
        let finished = view.summary.is_some();
        if self.confirm_cancel {
            // A second Ctrl-C confirms: people who hit it twice mean it.
            if ctrl_c || matches!(key.code, KeyCode::Char('y' | 'Y')) {
                self.confirm_cancel = false;
                self.cancelling = true;
                return KeyAction::Cancel;
            }
            if matches!(key.code, KeyCode::Char('n' | 'N' | 'q') | KeyCode::Esc) {
                self.confirm_cancel = false;
            }
            return KeyAction::None;
        }
        if self.help && !finished {
            self.help = false;
            if ctrl_c {
                self.open_cancel_prompt();
            }
            return KeyAction::None;
        }
        let page = self.page(view).max(1);
        let max = self.max_scroll(view);
        match key.code {
            KeyCode::Down => self.scroll = (self.scroll + 1).min(max),
            KeyCode::Up => self.scroll = self.scroll.saturating_sub(1).min(max),
            KeyCode::PageDown => self.scroll = (self.scroll + page).min(max),
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(page).min(max),
            KeyCode::Home => self.scroll = 0,
            KeyCode::End => self.scroll = max,
            KeyCode::Char('f') => {
                self.only_unfinished = !self.only_unfinished;
                self.scroll = 0;
            }
            // The final screen stays until any other key.
            _ if finished => return KeyAction::Quit,
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('q') | KeyCode::Esc => self.open_cancel_prompt(),
            _ if ctrl_c => self.open_cancel_prompt(),
            _ => {}
        }
        KeyAction::None
    }
}

/// Reads keys on its own thread (crossterm's reads block) and forwards
/// them; stops within [`KEY_POLL`] when dropped.
pub(super) struct KeyReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeyReader {
    pub(super) fn spawn(tx: UnboundedSender<Input>) -> io::Result<KeyReader> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dashboard-keys".into())
            .spawn(move || {
                use crossterm::event::{Event as Term, poll, read};
                while !flag.load(Ordering::SeqCst) {
                    match poll(KEY_POLL) {
                        Ok(false) => continue,
                        Ok(true) => {}
                        Err(_) => return,
                    }
                    let input = match read() {
                        Ok(Term::Key(key)) => Input::Key(key),
                        Ok(Term::Resize(..)) => Input::Resize,
                        Ok(_) => continue,
                        Err(_) => return,
                    };
                    if tx.send(input).is_err() {
                        return;
                    }
                }
            })?;
        Ok(KeyReader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KeyReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

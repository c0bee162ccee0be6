//! The actions of one input, collected in any order and emitted in the one order the driver
//! relies on (see [`Action`]). Handlers say *what* comes out; the order is decided here only.

use super::action::{Action, Answer, Job, Notice};
use super::state::{Event, Progress};
use crate::prelude::*;

/// What one input leads to, before it is put in order. The job is not collected here: a
/// handler returns the one job it asks for, so asking for two is not expressible, and
/// [`Outputs::finish`] puts it last.
#[derive(Debug, Default)]
pub(super) struct Outputs {
    replayed: Vec<Event>,
    persist: bool,
    warning: Option<Notice>,
    events: Vec<Event>,
    progress: Option<Progress>,
    notices: Vec<Notice>,
    answer: Option<Answer>,
    check: bool,
}

impl Outputs {
    /// Events persisted with the last transition, told again (at least once delivery); the
    /// state that forgets them is persisted after them.
    pub fn replay(&mut self, events: Vec<Event>) {
        if !events.is_empty() {
            self.replayed = events;
            self.persist = true;
        }
    }

    /// The state changed in a way that must survive a restart.
    pub fn persist(&mut self) {
        self.persist = true;
    }

    /// An event of this step. Its sequence number was taken from the state, so the state is
    /// persisted before the event is reported: a number is never given to two events.
    pub fn report(&mut self, event: Event) {
        self.persist = true;
        self.events.push(event);
    }

    pub fn progress(&mut self, progress: Progress) {
        self.progress = Some(progress);
    }

    /// The disruption the job of this step causes at once (the reboot): told first.
    pub fn warn(&mut self, notice: Notice) {
        debug_assert!(self.warning.is_none(), "one disruption per step");
        self.warning = Some(notice);
    }

    pub fn notify(&mut self, notice: Notice) {
        self.notices.push(notice);
    }

    /// The answer to the user's request; a request has exactly one.
    pub fn answer(&mut self, answer: Answer) {
        debug_assert!(self.answer.is_none(), "a second answer: {answer:?}");
        self.answer = Some(answer);
    }

    pub fn check(&mut self) {
        self.check = true;
    }

    /// The events this step made (not the replayed ones): persisted with it, to be told again
    /// if a restart comes before they were reported.
    pub fn made(&self) -> &[Event] {
        &self.events
    }

    /// The actions in the driver's order, with `job` last.
    pub fn finish(self, job: Option<Job>) -> Vec<Action> {
        let mut actions = Vec::new();
        actions.extend(self.replayed.into_iter().map(Action::Report));
        if self.persist {
            actions.push(Action::Persist);
        }
        actions.extend(self.warning.map(Action::Notify));
        actions.extend(self.events.into_iter().map(Action::Report));
        actions.extend(self.progress.map(Action::ReportProgress));
        actions.extend(self.notices.into_iter().map(Action::Notify));
        actions.extend(self.answer.map(Action::Answer));
        if self.check {
            actions.push(Action::Check);
        }
        actions.extend(job.map(Action::Run));
        actions
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;
    use crate::engine::EventKind;

    fn event(seq: u64) -> Event {
        Event::about(seq, Timestamp::UNIX_EPOCH, EventKind::Resumed, None)
    }

    fn disruption(seconds: u64) -> Notice {
        Notice::DisruptionAhead {
            txn: "1-abc".into(),
            seconds,
            postponable: false,
            downtime_seconds: 0,
        }
    }

    /// The handlers may collect in any order; what comes out is always in the driver's order.
    #[test]
    fn actions_come_out_in_the_canonical_order_whatever_order_they_were_collected_in() {
        let mut out = Outputs::default();
        out.check();
        out.answer(Answer::Done);
        out.notify(disruption(300));
        out.report(event(8));
        out.warn(disruption(0));
        out.replay(vec![event(7)]);
        out.report(event(9));
        let actions = out.finish(Some(Job::Reboot));
        assert_eq!(
            actions,
            [
                Action::Report(event(7)),
                Action::Persist,
                Action::Notify(disruption(0)),
                Action::Report(event(8)),
                Action::Report(event(9)),
                Action::Notify(disruption(300)),
                Action::Answer(Answer::Done),
                Action::Check,
                Action::Run(Job::Reboot),
            ]
        );
    }

    #[test]
    fn an_event_is_always_persisted_before_it_is_reported() {
        let mut out = Outputs::default();
        out.report(event(1));
        assert_eq!(
            out.finish(None),
            [Action::Persist, Action::Report(event(1))]
        );
        let mut out = Outputs::default();
        out.persist();
        out.persist();
        assert_eq!(out.finish(None), [Action::Persist], "one write per step");
        assert_eq!(Outputs::default().finish(None), []);
    }

    #[test]
    #[should_panic(expected = "a second answer")]
    #[cfg(debug_assertions)]
    fn a_request_is_answered_once() {
        let mut out = Outputs::default();
        out.answer(Answer::Done);
        out.answer(Answer::Done);
    }
}

//! Where a transaction's delivery to its partner program stands, and how one attempt's
//! outcome moves it on: due → in flight → completed / failed / due again later.
//!
//! Pure: time is passed in and nothing here sends or stores anything. The store keeps a
//! [`Delivery`] beside each transaction issued to a program with a partner, and an outbox
//! entry for each one that is `pending`, keyed by when it is due.

use crate::domain::BusinessId;

/// A merchant webhook event to record in the same write as the change that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// The business's webhook URL it goes to.
    pub target: String,
    /// `transaction.completed`, `transaction.failed`, …
    pub kind: &'static str,
    /// The JSON body, rendered now.
    pub payload: Vec<u8>,
}

/// A recorded merchant webhook event and its delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    /// `evt_…`: opaque, unique per event; the `webhook-id` of every attempt.
    pub id: String,
    pub business: BusinessId,
    pub target: String,
    pub kind: String,
    pub created_at: u64,
    pub payload: Vec<u8>,
    pub delivery: Delivery,
}

/// Where a delivery stands, as the merchant sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Recorded here; the partner has not confirmed it yet.
    Pending,
    /// The partner confirmed it (or there is no partner to deliver to).
    Completed,
    /// The partner refused it, could not be reached through the whole schedule, or was
    /// removed from the configuration.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Completed => "completed",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryStatus> {
        match text {
            "pending" => Some(DeliveryStatus::Pending),
            "completed" => Some(DeliveryStatus::Completed),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// Why a delivery failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The partner answered with a 4xx (other than 408, 425, 429) or a redirect.
    Rejected,
    /// Every attempt of the schedule failed transiently.
    Unreachable,
    /// The program's partner was removed from the configuration before delivery.
    Removed,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Rejected => "partner-rejected",
            FailureKind::Unreachable => "partner-unreachable",
            FailureKind::Removed => "partner-removed",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            FailureKind::Rejected => 1,
            FailureKind::Unreachable => 2,
            FailureKind::Removed => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<FailureKind> {
        match code {
            1 => Some(FailureKind::Rejected),
            2 => Some(FailureKind::Unreachable),
            3 => Some(FailureKind::Removed),
            _ => None,
        }
    }
}

/// The last failure of a delivery, for the merchant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryError {
    pub kind: FailureKind,
    /// The partner's HTTP status, when it answered.
    pub http_status: Option<u16>,
    /// The partner's reason (the first 512 characters of its body) or what went wrong.
    pub detail: String,
}

/// A delivery's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub status: DeliveryStatus,
    /// Attempts made, over all schedules.
    pub attempts: u32,
    /// Attempts made in the current schedule (a redelivery starts a fresh one).
    pub step: u32,
    pub last_attempt_at: Option<u64>,
    /// When the next attempt is due; `Some` exactly while `pending`.
    pub next_attempt_at: Option<u64>,
    pub partner_transaction_id: Option<String>,
    pub error: Option<DeliveryError>,
}

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        partner_transaction_id: Option<String>,
    },
    /// A transient failure: try again at the next step of the schedule (or later, if the
    /// partner asked with `Retry-After`).
    Retry {
        http_status: Option<u16>,
        detail: String,
        retry_after: Option<u64>,
    },
    /// A final failure.
    Failed(DeliveryError),
}

impl Delivery {
    /// A due debit (`self`) held behind its transaction's credit: `None` while the credit
    /// has completed (the debit is sent now). While the credit is pending, the debit waits
    /// for the credit's next attempt, or `patience` seconds when that is due already (its
    /// move re-times the debit sooner). A failed or missing credit completes the debit
    /// without a partner call: the partner never had the points. Both backends' writers
    /// decide with this.
    pub fn held_behind(
        &self,
        credit: Option<&Delivery>,
        now: u64,
        patience: u64,
    ) -> Option<Delivery> {
        match credit.map(|c| (c.status, c.next_attempt_at)) {
            Some((DeliveryStatus::Completed, _)) => None,
            Some((DeliveryStatus::Pending, due)) => Some(Delivery {
                next_attempt_at: Some(match due {
                    Some(due) if due > now => due,
                    _ => now.saturating_add(patience.max(1)),
                }),
                ..self.clone()
            }),
            _ => Some(Delivery {
                status: DeliveryStatus::Completed,
                next_attempt_at: None,
                ..self.clone()
            }),
        }
    }

    /// A new delivery, due at once.
    pub fn new(now: u64) -> Delivery {
        Delivery {
            status: DeliveryStatus::Pending,
            attempts: 0,
            step: 0,
            last_attempt_at: None,
            next_attempt_at: Some(now),
            partner_transaction_id: None,
            error: None,
        }
    }

    /// The state after an attempt made at `now` came to `attempt`. `schedule[i]` is the
    /// wait after attempt `i + 1`; after the last step a transient failure is final. A
    /// `Retry-After` is honoured up to the schedule's largest step.
    pub fn after(&self, attempt: Attempt, now: u64, schedule: &[u64]) -> Delivery {
        let mut next = self.clone();
        next.attempts = self.attempts.saturating_add(1);
        next.step = self.step.saturating_add(1);
        next.last_attempt_at = Some(now);
        next.next_attempt_at = None;
        match attempt {
            Attempt::Delivered {
                partner_transaction_id,
            } => {
                next.status = DeliveryStatus::Completed;
                next.partner_transaction_id = partner_transaction_id;
                next.error = None;
            }
            Attempt::Failed(error) => {
                next.status = DeliveryStatus::Failed;
                next.error = Some(error);
            }
            Attempt::Retry {
                http_status,
                detail,
                retry_after,
            } => match schedule.get(self.step as usize) {
                Some(&wait) => {
                    let longest = schedule.iter().copied().max().unwrap_or(wait);
                    let wait = retry_after.map_or(wait, |asked| asked.clamp(wait, longest));
                    next.status = DeliveryStatus::Pending;
                    next.next_attempt_at = Some(now.saturating_add(wait));
                    next.error = Some(DeliveryError {
                        kind: FailureKind::Unreachable,
                        http_status,
                        detail,
                    });
                }
                None => {
                    next.status = DeliveryStatus::Failed;
                    next.error = Some(DeliveryError {
                        kind: FailureKind::Unreachable,
                        http_status,
                        detail,
                    });
                }
            },
        }
        next
    }

    /// A failed delivery back to pending with a fresh schedule, due at once. `None` if it
    /// is not failed.
    pub fn redeliver(&self, now: u64) -> Option<Delivery> {
        (self.status == DeliveryStatus::Failed).then(|| Delivery {
            status: DeliveryStatus::Pending,
            step: 0,
            next_attempt_at: Some(now),
            ..self.clone()
        })
    }

    /// A pending delivery whose destination (the program's partner, a merchant webhook)
    /// is no longer configured: failed, saying so in `detail`.
    pub fn removed(&self, now: u64, detail: &str) -> Delivery {
        Delivery {
            status: DeliveryStatus::Failed,
            next_attempt_at: None,
            last_attempt_at: self.last_attempt_at.or(Some(now)),
            error: Some(DeliveryError {
                kind: FailureKind::Removed,
                http_status: None,
                detail: detail.to_owned(),
            }),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(after: Option<u64>) -> Attempt {
        Attempt::Retry {
            http_status: Some(503),
            detail: "busy".into(),
            retry_after: after,
        }
    }

    #[test]
    fn a_debit_waits_for_a_pending_credit_and_settles_behind_a_failed_one() {
        let debit = Delivery::new(100);
        let mut credit = Delivery::new(100);
        credit.next_attempt_at = Some(160);
        let held = debit.held_behind(Some(&credit), 120, 30).expect("held");
        assert_eq!(
            (held.status, held.next_attempt_at),
            (DeliveryStatus::Pending, Some(160))
        );
        // A credit due already (in flight): the debit waits `patience`.
        credit.next_attempt_at = Some(110);
        let held = debit.held_behind(Some(&credit), 120, 30).expect("held");
        assert_eq!(held.next_attempt_at, Some(150));
        credit.status = DeliveryStatus::Completed;
        credit.next_attempt_at = None;
        assert_eq!(debit.held_behind(Some(&credit), 120, 30), None);
        credit.status = DeliveryStatus::Failed;
        let settled = debit.held_behind(Some(&credit), 120, 30).expect("settled");
        assert_eq!(
            (settled.status, settled.next_attempt_at),
            (DeliveryStatus::Completed, None)
        );
        assert_eq!(settled.attempts, 0, "no partner call");
        assert_eq!(
            debit.held_behind(None, 120, 30).expect("settled").status,
            DeliveryStatus::Completed
        );
    }

    #[test]
    fn transient_failures_follow_the_schedule_then_fail() {
        let schedule = [5, 300];
        let d = Delivery::new(100);
        let d = d.after(retry(None), 100, &schedule);
        assert_eq!(
            (d.status, d.next_attempt_at),
            (DeliveryStatus::Pending, Some(105))
        );
        let d = d.after(retry(None), 105, &schedule);
        assert_eq!(d.next_attempt_at, Some(405));
        let d = d.after(retry(None), 405, &schedule);
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(d.attempts, 3);
        let error = d.error.clone().expect("error");
        assert_eq!(error.kind, FailureKind::Unreachable);
        assert_eq!(error.http_status, Some(503));
        // Redelivery: a fresh schedule, attempts keep counting.
        let d = d.redeliver(500).expect("failed can be redelivered");
        assert_eq!(
            (d.status, d.step, d.attempts),
            (DeliveryStatus::Pending, 0, 3)
        );
        assert_eq!(d.next_attempt_at, Some(500));
        assert!(d.redeliver(500).is_none(), "only a failed one");
        let d = d.after(
            Attempt::Delivered {
                partner_transaction_id: Some("p-1".into()),
            },
            501,
            &schedule,
        );
        assert_eq!(d.status, DeliveryStatus::Completed);
        assert_eq!(d.error, None);
        assert_eq!(d.next_attempt_at, None);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_longest_step() {
        let schedule = [5, 300];
        let d = Delivery::new(0);
        assert_eq!(
            d.after(retry(Some(60)), 0, &schedule).next_attempt_at,
            Some(60)
        );
        assert_eq!(
            d.after(retry(Some(99_999)), 0, &schedule).next_attempt_at,
            Some(300)
        );
        // Never sooner than the schedule says.
        assert_eq!(
            d.after(retry(Some(1)), 0, &schedule).next_attempt_at,
            Some(5)
        );
    }

    #[test]
    fn a_rejection_is_final_at_once() {
        let d = Delivery::new(0).after(
            Attempt::Failed(DeliveryError {
                kind: FailureKind::Rejected,
                http_status: Some(400),
                detail: "unknown member".into(),
            }),
            1,
            &[5],
        );
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(d.next_attempt_at, None);
    }
}

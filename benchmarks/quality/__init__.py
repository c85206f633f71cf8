"""Attribution-quality harness: batched subset retraining (:mod:`.retrain`) and the LDS (:mod:`.lds`)."""

__all__ = ["lds", "retrain"]

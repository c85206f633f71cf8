"""Attribution-quality harness (:mod:`.run`): infotrace against its peers (:mod:`.peers`) stage by stage
(:mod:`.stages`), on batched subset retraining (:mod:`.retrain`) and the LDS (:mod:`.lds`)."""

__all__ = [
    "infotrace_method",
    "lds",
    "metrics",
    "peers",
    "report",
    "retrain",
    "run",
    "setting",
    "stages",
]

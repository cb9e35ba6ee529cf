"""d2v's self-supervised targets and objectives (data2vec 1.0 and 2.0).

The objectives themselves live in core (:mod:`d2v.ssl.distill`, :mod:`d2v.ssl.distill2`) because they
are modality-agnostic; this plugin registers them next to the target they regress.
"""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("target", "data2vec", "d2v_targets.data2vec:Data2VecTarget",
             summary="top-K teacher layer average (instance/layer norm per layer, optional final norm), L2 / smooth-L1 loss")
    register("objective", "data2vec", "d2v.ssl.distill:SelfDistillation",
             summary="data2vec 1.0: masked student + regression head regresses an EMA teacher's targets")
    register("objective", "data2vec2", "d2v.ssl.distill2:Data2Vec2",
             summary="data2vec 2.0: student encodes kept tokens only, M masks per sample, conv decoder")

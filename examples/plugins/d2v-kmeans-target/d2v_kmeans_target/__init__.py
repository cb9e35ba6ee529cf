"""Example d2v plugin: a HuBERT-style k-means cluster target, swapped in by one line of a spec."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("target", "kmeans", "d2v_kmeans_target.target:KMeansTarget",
             summary="online k-means cluster id of the teacher's top-K layer average, cross-entropy loss (HuBERT-style)")

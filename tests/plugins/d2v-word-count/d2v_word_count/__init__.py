"""Example d2v plugin: registering a component is all a plugin module has to do."""

from d2v import hookimpl


@hookimpl
def d2v_register(register):
    register("head", "word_count", "d2v_word_count.head:WordCountHead",
             summary="classify how many words an utterance has (mean-pooled encoder output)")

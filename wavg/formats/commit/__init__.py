"""How an output of several files is committed so that it is always the old one or the new
one: locally (`local`) and in object storage (`remote`)."""

from gid import logs

logs.add_logger(__name__)  # the sweep's lines show like gid's own

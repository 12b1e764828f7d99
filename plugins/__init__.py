"""Domain plugins shipped with difftilt. Each is found through the ``difftilt.plugins``
entry-point group, like any third-party plugin; the core never imports them."""

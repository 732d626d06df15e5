"""The HTTP layer of the function app: routes as Blueprints, the pages and JSON they answer with, and the one place
where domain outcomes become HTTP statuses. ``collectors/`` and ``shared/`` know nothing of HTTP; this package is
the only one besides ``function_app.py`` that imports ``azure.functions``.

Routes (under /api):
  GET    mailboxes                       list mailboxes with their status          (function key)   admin.py
  POST   mailboxes                       add an app-mode mailbox (access proven)   (function key)   admin.py
  GET    mailboxes/{address}             one mailbox's status                      (function key)   admin.py
  PATCH  mailboxes/{address}             change its folder, after-action or caps   (function key)   admin.py
  DELETE mailboxes/{address}             revoke: delete its token and row          (function key)   admin.py
  GET    mailboxes/{address}/authorize   start the consent flow                    (function key)   consent.py
  POST   mailboxes/{address}/pause       stop collecting, keep the token alive     (function key)   operations.py
  POST   mailboxes/{address}/resume      collect again from the checkpoint         (function key)   operations.py
  POST   mailboxes/{address}/reconsent-link  a signed single-use link for the owner (function key)  operations.py
  GET    mailboxes/{address}/diagnose    token claims, IMAP login, folders, backlog (function key)  operations.py
  POST   mailboxes/{address}/replay      queue archived envelopes again            (function key)   operations.py
  GET    status                          sign in to the status page, go to ops     (function key)   operations.py
  GET    ops, POST ops                   the status page and its actions; anonymous to the host, checked by its
                                         signed session cookie and CSRF token                       operations.py
  GET    reconsent, POST reconsent       the owner's re-consent link; anonymous, checked by its signature,
                                         expiry and single use                                      operations.py
  POST   auth/callback                   Entra's form post; anonymous because the OAuth "code" parameter
                                         collides with the function key's "code"                    consent.py
"""

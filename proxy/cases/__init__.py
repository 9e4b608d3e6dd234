"""The confidentiality workflows, each a case with a reason, an approver and an audit record: break-glass,
disclosure grants, consent, subject access, restriction, erasure and retention (issues 9 and 10).

They sit beside the request path as the lifecycles do: the app consults them (is this client restricted,
is a break-glass grant open), they never import the app or the CLI."""

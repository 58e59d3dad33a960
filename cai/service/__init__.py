"""`cai serve`: a job server over a workspace folder, with an HTTP API and a web dashboard."""

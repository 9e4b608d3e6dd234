// json-server middleware: the CRM refuses some writes for a while, as a real one under load does.
// FG_FLAKY_PATCH="notes/5:2,notes/9:100" answers 503 to the first 2 PATCHes of /notes/5 and the first
// 100 of /notes/9; every other request goes on to json-server.
const left = {};
for (const item of (process.env.FG_FLAKY_PATCH || "").split(",").filter(Boolean)) {
  const [path, count] = item.split(":");
  left["/" + path] = Number(count);
}
module.exports = (req, res, next) => {
  const path = req.path.replace(/\/$/, "");
  if (req.method === "PATCH" && left[path] > 0) {
    left[path] -= 1;
    res.status(503).json({ error: "busy, try again" });
    return;
  }
  next();
};

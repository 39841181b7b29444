// The server's errors in the page's words. The API answers with the reader's whole message (problem,
// then ". Fix: " and advice written for the command line: flags, `msnet ...` commands, environment
// variables); the page shows what went wrong and what the person at the page can do, and keeps the
// server's message under "Details".
"use strict";

const PageErrors = (() => {
  // advice meant for a terminal or a server's administrator, not for the page
  const CLI_WORDS = /--[a-z]|`|\bmsnet\b|\bMSNET_[A-Z_]+|\bSTUDY\b|\bseries=|\bpass (?:series|one of the)|\bRUN\//;
  const UPLOAD_HINT = "Upload the CT series itself: a .zip of its DICOM folder, its DICOM files, " +
                      "or a .nii/.nii.gz or .mha file.";

  const sentence = (s) => {
    s = String(s || "").trim().replace(/[.;:\s]+$/, "");
    return s ? s.charAt(0).toUpperCase() + s.slice(1) + "." : "";
  };

  // "path: problem. Fix: advice" -> {problem, fix}
  function split(detail) {
    if (Array.isArray(detail)) detail = detail.map((d) => (d && d.msg) || String(d)).join("; ");
    const text = String(detail || "").trim();
    const at = text.indexOf(". Fix: ");
    return at < 0 ? { problem: text, fix: "" } : { problem: text.slice(0, at), fix: text.slice(at + 7) };
  }

  // the advice's clauses that suit the page ("pass a chest CT series" -> "Upload a chest CT series"),
  // without those written for a terminal ("`msnet inspect STUDY` lists every check")
  function pageAdvice(fix) {
    const kept = String(fix || "").split(/;\s+/)
      .map((c) => c.trim().replace(/^pass\b/i, "upload"))
      .filter((c) => c && !CLI_WORDS.test(c));
    return kept.length ? sentence(kept.join("; ")) : "";
  }

  // {text, details}: the sentence to show, and the server's message when it says more than the sentence
  function upload(status, detail) {
    const { problem, fix } = split(detail);
    const plain = problem && !CLI_WORDS.test(problem) ? problem : "";
    const advice = pageAdvice(fix);
    let text;
    if (status === 401) text = "The server needs an API key: enter the key you were given, then analyse again.";
    else if (status === 408) text = "The upload stalled. Check the connection and analyse again.";
    else if (status === 413) text = "The study is too large for this server" + (plain ? ` (${plain.replace(/\.$/, "")})` : "") +
                                    ". Upload the CT series alone, without other series, or ask the server's " +
                                    "administrator to raise the limit.";
    else if (status === 422) text = "This study could not be analysed" + (plain ? `: ${plain.replace(/\.$/, "")}` : "") +
                                    ". " + (advice || UPLOAD_HINT);
    else if (status === 503) text = "The server is busy with other studies. Analyse again in a minute.";
    else if (status === 504) text = "The analysis took too long. Try again later, or ask the server's administrator.";
    else if (status >= 500) text = "The server failed while analysing this study. Its administrator finds the " +
                                   "cause in the server's log.";
    else if (status === 0) text = "The upload failed: the connection closed (the study may be over the size limit).";
    else text = `The request failed (${status})` + (plain ? `: ${plain.replace(/\.$/, "")}` : "") + ".";
    const raw = split(detail).problem + (fix ? `. Fix: ${fix}` : "");
    return { text, details: raw && !text.includes(raw) ? raw : "" };
  }

  // the viewer's requests (a slice, a Grad-CAM map): one sentence
  function viewer(status, detail) {
    if (status === 404) return "The server no longer keeps this study for viewing: analyse it again to scroll it.";
    if (status === 503) return "The server is busy: scroll again in a moment to load this slice.";
    if (status === 504) return "This slice's heat map took too long; scroll again to retry.";
    if (status >= 500) return "The server could not draw this slice; its administrator finds the cause in the server's log.";
    const { problem } = split(detail);
    return "The viewer could not load this slice" + (problem && !CLI_WORDS.test(problem) ? `: ${problem}` : "") + ".";
  }

  return { upload, viewer, split, pageAdvice, CLI_WORDS };
})();

if (typeof module !== "undefined") module.exports = PageErrors;  // for tests run with node

'use strict';
// forkd guest helper (installed as /usr/lib/forkd/workers/cdp-page.js): load a URL in the page
// that a recipe's warm browser keeps open, over the Chrome DevTools Protocol, and print the
// page's title and the text of one element. The browser recipes start Chromium with
// --remote-debugging-port=9222 (loopback only), so any process in the guest can drive it.
//
//   node /usr/lib/forkd/workers/cdp-page.js URL [SELECTOR]    ->  "TITLE / TEXT"
const { chromium } = require('/opt/forkd/node/node_modules/playwright-core');

(async () => {
  const [url, selector] = process.argv.slice(2);
  if (!url) throw new Error('usage: cdp-page.js URL [SELECTOR]');
  const browser = await chromium.connectOverCDP('http://127.0.0.1:9222', { timeout: 0 });
  const context = browser.contexts()[0];
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(0); // a slow (emulated) CPU is not an error
  await page.goto(url);
  const title = await page.title();
  const text = selector ? await page.textContent(selector) : '';
  console.log(`${title} / ${text}`);
  // Exit without browser.close(): that would stop the warm browser for everyone else.
  process.exit(0);
})().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
